"""Tests of visionpipe/serving/policies.py: validation, JSON round trips, decisions, conformal sets."""

import itertools
import json

import numpy as np
import pytest
from scipy.stats import kstest

from visionpipe.phases.conformal import ConformalError, fit_conformal
from visionpipe.serving.policies import (
    ConformalConfig,
    HybridPolicy,
    PolicyError,
    ScrcPolicy,
    ThresholdPolicy,
    apply_policy,
    aps_u,
    conformal_score_matrix,
    conformal_sets,
    policy_from_dict,
    scrc_sets,
)

BINARY = ThresholdPolicy(0.4, "raw", "binary", positive_index=1)
MULTI = ThresholdPolicy(0.6, "raw", "multiclass", conformal=ConformalConfig("aps-conservative", 0.9, 0.1, space="raw"))
RANDOMIZED = ThresholdPolicy(0.6, "raw", "multiclass", conformal=ConformalConfig("aps", 0.5, 0.1, space="raw"))
SCRC = ScrcPolicy(0.7, 0.2, alpha=0.1, delta=0.1, target_selection_rate=0.9, space="calibrated")
HYBRID = HybridPolicy(
    {"threshold": ThresholdPolicy(0.55, "calibrated", "binary", 0), "scrc": SCRC, "raw": BINARY}, "threshold", "raw"
)


@pytest.mark.parametrize("policy", [BINARY, MULTI, RANDOMIZED, SCRC, HYBRID])
def test_round_trip_through_json(policy: object) -> None:
    d = policy.to_dict()  # type: ignore[attr-defined]
    again = policy_from_dict(json.loads(json.dumps(d, sort_keys=True)))
    assert again == policy
    assert again.to_dict() == d


def _mutate(base: dict[str, object], path: tuple[str, ...], value: object) -> dict[str, object]:
    d = json.loads(json.dumps(base))
    node = d
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    out: dict[str, object] = d
    return out


@pytest.mark.parametrize(
    ("base", "path", "value", "match"),
    [
        (BINARY, ("kind",), "quantile", "kind='quantile'"),
        (BINARY, ("threshold",), 1.5, "threshold=1.5 must lie in"),
        (BINARY, ("threshold",), -0.1, "threshold=-0.1"),
        (BINARY, ("threshold",), True, "threshold=True must be a number"),
        (BINARY, ("space",), "logit", "space='logit' is not one of"),
        (BINARY, ("task",), "multilabel", "task='multilabel'"),
        (BINARY, ("threshold",), KeyError, r"missing field\(s\) \['threshold'\]"),
        (BINARY, ("extra",), 1, r"unknown field\(s\) \['extra'\]"),
        (MULTI, ("conformal", "method"), "naive", "conformal.method='naive'"),
        (MULTI, ("conformal", "alpha"), 0.0, "conformal.alpha=0.0"),
        (BINARY, ("conformal",), {"method": "lac", "qhat": 0.5, "alpha": 0.1, "randomization": "x"}, "applies to"),
        (MULTI, ("conformal", "randomization"), None, "needs randomization="),
        (RANDOMIZED, ("conformal", "randomization"), "uniform-v0", "'uniform-v0' is not a known APS u rule"),
        (RANDOMIZED, ("conformal", "randomization"), None, "needs randomization="),
        (RANDOMIZED, ("conformal", "randomization"), 3, "must be a string or null"),
        (SCRC, ("empty_set",), "empty", "empty_set='empty' is not one of"),
        (SCRC, ("delta",), 1.0, "delta=1.0"),
        (SCRC, ("set_threshold",), 2.0, "set_threshold=2.0"),
        (HYBRID, ("active",), "missing", "active='missing' names no sub-policy"),
        (HYBRID, ("fallback",), "threshold", "fallback='threshold' must differ"),
        (HYBRID, ("policies", "scrc"), HYBRID.to_dict(), "must be threshold or scrc"),
        (HYBRID, ("policies",), {}, "non-empty"),
    ],
)
def test_policy_from_dict_rejects_invalid(base: object, path: tuple[str, ...], value: object, match: str) -> None:
    with pytest.raises(PolicyError, match=match):
        policy_from_dict(_mutate(base.to_dict(), path, value))  # type: ignore[attr-defined]


def test_binary_threshold_is_inclusive_and_reads_its_space() -> None:
    raw = np.array([[0.6, 0.4], [0.61, 0.39], [0.0, 1.0]])
    cal = raw[::-1].copy()
    out = apply_policy(BINARY, cal, raw)
    np.testing.assert_array_equal(out.labels, [1, 0, 1])  # p_pos == t is positive
    assert out.prediction_sets == [[1], [0], [1]]
    assert out.policy_names == ["threshold"] * 3
    flipped = ThresholdPolicy(0.4, "calibrated", "binary", positive_index=1)
    np.testing.assert_array_equal(apply_policy(flipped, cal, raw).labels, [1, 0, 1][::-1])


def test_multiclass_abstains_and_attaches_conformal_sets() -> None:
    probs = np.array([[0.7, 0.2, 0.1], [0.45, 0.44, 0.11], [0.34, 0.33, 0.33]])
    out = apply_policy(MULTI, probs, probs)
    np.testing.assert_array_equal(out.labels, [0, -1, -1])
    assert out.prediction_sets[0] == [0]
    # conservative APS, qhat 0.9: classes whose mass strictly above them <= 0.9 (the crossing class included,
    # whatever u)
    assert out.prediction_sets[1] == [0, 1, 2]  # above = 0, 0.45, 0.89
    assert out.prediction_sets[2] == [0, 1, 2]  # above = 0, 0.34, 0.67
    bare = ThresholdPolicy(0.6, "raw", "multiclass")
    assert apply_policy(bare, probs, probs).prediction_sets == [[0], [], []]


def test_scrc_singletons_decide_and_others_abstain() -> None:
    cal = np.array([[0.9, 0.1], [0.75, 0.25], [0.6, 0.4], [0.05, 0.95]])
    policy = ScrcPolicy(0.7, 0.3, alpha=0.1, delta=0.1, target_selection_rate=0.75)
    out = apply_policy(policy, cal, cal)
    # row 0: selected, set {0}; row 1: selected, 1 - 0.25 = 0.75 > 0.3 so {0}; row 2: not selected; row 3: {1}
    np.testing.assert_array_equal(out.labels, [0, 0, -1, 1])
    assert out.prediction_sets == [[0], [0], [], [1]]
    wide = ScrcPolicy(0.7, 0.8, alpha=0.1, delta=0.1, target_selection_rate=0.75)
    out = apply_policy(wide, cal, cal)
    np.testing.assert_array_equal(out.labels, [0, -1, -1, 1])
    assert out.prediction_sets[1] == [0, 1]


def test_hybrid_falls_back_on_unusable_rows() -> None:
    raw = np.array([[0.3, 0.7], [0.8, 0.2], [0.5, 0.5]])
    cal = np.array([[0.2, 0.8], [np.nan, np.nan], [0.56, 0.44]])
    out = apply_policy(HYBRID, cal, raw)
    # active: positive_index 0, threshold 0.55 on calibrated; fallback: positive_index 1, 0.4 on raw
    np.testing.assert_array_equal(out.labels, [1, 0, 0])
    assert out.policy_names == ["threshold", "raw", "threshold"]


def test_non_finite_rows_abstain_without_a_fallback() -> None:
    cal = np.array([[np.inf, 0.0], [0.2, 0.8]])
    out = apply_policy(ThresholdPolicy(0.5, "calibrated", "binary"), cal, cal)
    np.testing.assert_array_equal(out.labels, [-1, 1])


def test_shape_mismatch_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="must both be"):
        apply_policy(BINARY, np.zeros((2, 2)), np.zeros((3, 2)))
    with pytest.raises(PolicyError, match="K=3"):
        apply_policy(BINARY, np.full((2, 3), 1 / 3), np.full((2, 3), 1 / 3))


@pytest.mark.parametrize("method", ["lac", "aps", "aps-conservative", "aps-legacy", "raps"])
def test_conformal_sets_are_nested_in_qhat(method: str) -> None:
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(6), size=200)
    sizes = [
        conformal_sets(probs, ConformalConfig(method, q, 0.1, lam=0.05, k_reg=1)).sum(axis=1)
        for q in np.linspace(0, 1.3, 14)
    ]
    assert all(np.all(a <= b) for a, b in itertools.pairwise(sizes))


def test_aps_scores_accumulate_in_probability_order() -> None:
    probs = np.array([[0.1, 0.6, 0.3]])
    np.testing.assert_allclose(conformal_score_matrix(probs, "aps-legacy"), [[1.0, 0.6, 0.9]])
    np.testing.assert_allclose(conformal_score_matrix(probs, "lac"), [[0.9, 0.4, 0.7]])
    np.testing.assert_allclose(conformal_score_matrix(probs, "raps", lam=0.1, k_reg=1), [[1.2, 0.6, 1.0]])


def test_randomized_aps_score_is_the_mass_above_plus_u_times_p() -> None:
    probs = np.array([[0.1, 0.6, 0.3], [0.25, 0.25, 0.5]])
    u = aps_u(probs)
    # ties are ranked by class index: in row 1, class 0 ranks above class 1
    above = np.array([[0.9, 0.0, 0.6], [0.5, 0.75, 0.0]])
    np.testing.assert_allclose(conformal_score_matrix(probs, "aps"), above + u[:, None] * probs)
    np.testing.assert_array_equal(
        conformal_score_matrix(probs, "aps-conservative"), conformal_score_matrix(probs, "aps")
    )
    config = ConformalConfig("aps", float(above[0, 2] + 0.5 * u[0] * 0.3), 0.1)  # between class 2's bounds
    mask = conformal_sets(probs[:1], config)
    assert mask.tolist() == [[False, True, u[0] * 0.3 <= config.qhat - 0.6]]


def test_aps_u_is_a_per_image_hash_of_its_probabilities() -> None:
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(10) * 0.3, size=4000)
    u = aps_u(probs)
    assert np.all((u > 0) & (u < 1))
    np.testing.assert_array_equal(aps_u(probs[::-1]), u[::-1])  # a row's u ignores the rest of the batch
    np.testing.assert_array_equal(aps_u(probs[17:18]), u[17:18])
    assert kstest(u, "uniform").pvalue > 1e-3  # spread like U(0, 1) over distinct images
    assert len(np.unique(u)) == len(u)
    noisy = probs * (1 + 1e-7 * rng.standard_normal(probs.shape))  # float noise between two code paths
    assert np.mean(aps_u(noisy / noisy.sum(axis=1, keepdims=True)) != u) < 0.005


def test_old_bundle_aps_keeps_its_non_randomized_meaning() -> None:
    """A conformal dict written before randomized APS ("aps", no randomization key) reads as aps-legacy,
    whose sets are exactly the old rule: classes whose mass at and above them is <= qhat."""
    old = {"method": "aps", "qhat": 0.8, "alpha": 0.1, "space": "raw", "lam": 0.0, "k_reg": 0}
    policy = policy_from_dict(
        {"kind": "threshold", "threshold": 0.6, "space": "raw", "task": "multiclass", "conformal": old}
    )
    config = policy.conformal
    assert config is not None and config.method == "aps-legacy" and config.randomization is None
    probs = np.random.default_rng(1).dirichlet(np.ones(5), size=300)
    order = np.argsort(-probs, axis=1, kind="stable")
    inclusive = np.empty_like(probs)
    np.put_along_axis(inclusive, order, np.cumsum(np.take_along_axis(probs, order, axis=1), axis=1), axis=1)
    np.testing.assert_array_equal(conformal_sets(probs, config), inclusive <= 0.8)
    assert policy_from_dict(policy.to_dict()) == policy  # written back as aps-legacy: the meaning survives
    with pytest.raises(ConformalError, match="aps-legacy"):
        fit_conformal(probs, probs.argmax(axis=1), 0.1, "aps-legacy")


def test_scrc_empty_set_rule() -> None:
    probs = np.array([[0.55, 0.45], [0.9, 0.1], [0.2, 0.8]])
    # set_threshold 0.2: 1 - p_y <= 0.2 holds for no class of row 0 (an empty set without the rule)
    selected, mask = scrc_sets(probs, 0.5, 0.2, "abstain")
    assert selected.all() and mask.tolist() == [[False, False], [True, False], [False, True]]
    _, mask = scrc_sets(probs, 0.5, 0.2, "top1")
    assert mask.tolist() == [[True, False], [True, False], [False, True]]
    top1 = ScrcPolicy(0.5, 0.2, alpha=0.1, delta=0.1, target_selection_rate=1.0)
    np.testing.assert_array_equal(apply_policy(top1, probs, probs).labels, [0, 0, 1])
    old_dict = {k: v for k, v in top1.to_dict().items() if k != "empty_set"}  # a bundle from before the rule
    old = policy_from_dict(old_dict)
    assert isinstance(old, ScrcPolicy) and old.empty_set == "abstain"
    np.testing.assert_array_equal(apply_policy(old, probs, probs).labels, [-1, 0, 1])
