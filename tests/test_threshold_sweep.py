"""Tests of visionpipe/phases/threshold_sweep.py: exactness of the sweep, objectives, degenerate inputs, outputs."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from visionpipe.data.logits import LogitsError, load_logits
from visionpipe.phases.threshold_sweep import (
    HTML_FILE,
    PLOT_FILE,
    ObjectiveInfeasibleError,
    SweepError,
    choose_abstain,
    choose_binary,
    exact_sweep,
    parse_objective,
    risk_coverage,
    run,
    sweep_html,
)
from visionpipe.serving.metrics import binary_metrics_from_counts, mcc, softmax
from visionpipe.serving.policies import apply_policy, policy_from_dict


def _binary_data(seed: int, n: int, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.random(n) < rng.uniform(0.2, 0.8)
    s = 1 / (1 + np.exp(-rng.normal(np.where(y, 0.8, -0.8), 1.3)))
    return (np.round(s, decimals) if decimals is not None else s), y


def _brute_force(s: np.ndarray, y: np.ndarray, metric: str) -> float:
    """Best metric over every rule 'positive iff s >= t', t in the distinct scores plus 'nothing positive'."""
    best = -np.inf
    for t in [*np.unique(s), np.inf]:
        p = s >= t
        counts = (np.sum(p & y), np.sum(p & ~y), np.sum(~p & ~y), np.sum(~p & y))
        best = max(best, float(binary_metrics_from_counts(*counts)[metric]))
    return best


def _write_logits(path: Path, k: int, n: int, seed: int, scale: float = 2.0, quantise: bool = False) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    for split in ("val_calib", "val_test"):
        y = rng.integers(0, k, n)
        z = rng.normal(0, 1, (n, k))
        z[np.arange(n), y] += 1.5
        z *= scale
        if quantise:  # many exact ties in the scores
            z = np.round(z)
        np.savez(path / f"{split}.npz", logits=z.astype(np.float32), labels=y.astype(np.int64))
    classes = [f"class{i}" for i in range(k)]
    meta = {"classes": classes, "positive_class": classes[0] if k == 2 else None}
    (path / "meta.json").write_text(json.dumps(meta))
    return path


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("decimals", [None, 2, 1])
def test_exact_mcc_equals_brute_force_over_distinct_thresholds(seed: int, decimals: int | None) -> None:
    s, y = _binary_data(seed, 60, decimals)
    curve = exact_sweep(s, y)
    best = choose_binary(curve, parse_objective("mcc"))
    assert curve.metrics["mcc"][best] == pytest.approx(_brute_force(s, y, "mcc"), abs=1e-12)


@pytest.mark.parametrize("seed", range(20))
def test_exact_mcc_is_at_least_every_grid_threshold(seed: int) -> None:
    s, y = _binary_data(100 + seed, 400, decimals=3 if seed % 2 else None)
    curve = exact_sweep(s, y)
    best = choose_binary(curve, parse_objective("mcc"))
    threshold = curve.threshold[best]
    exact = matthews_corrcoef(y, s >= threshold)  # the stored threshold realises the curve's MCC
    assert exact == pytest.approx(curve.metrics["mcc"][best], abs=1e-12)
    grid = [mcc(y, s >= t) for t in np.linspace(0, 1, 1001)]
    assert exact >= max(grid) - 1e-12


@pytest.mark.parametrize(
    ("objective", "metric", "constraint"),
    [
        ("f1", "f1", None),
        ("youden", "youden", None),
        ("recall_at_precision>=0.8", "recall", ("precision", 0.8)),
        ("precision_at_recall>=0.9", "precision", ("recall", 0.9)),
    ],
)
@pytest.mark.parametrize("seed", range(4))
def test_other_objectives_match_brute_force(
    objective: str, metric: str, constraint: tuple[str, float] | None, seed: int
) -> None:
    s, y = _binary_data(seed, 80, decimals=2)
    curve = exact_sweep(s, y)
    best = choose_binary(curve, parse_objective(objective))
    feasible = []
    for t in [*np.unique(s), np.inf]:
        p = s >= t
        m = binary_metrics_from_counts(np.sum(p & y), np.sum(p & ~y), np.sum(~p & ~y), np.sum(~p & y))
        if constraint is None or m[constraint[0]] >= constraint[1]:
            feasible.append(float(m[metric]))
    assert curve.metrics[metric][best] == pytest.approx(max(feasible), abs=1e-12)
    if constraint is not None:
        assert curve.metrics[constraint[0]][best] >= constraint[1]


def test_infeasible_constraint_raises_named_error() -> None:
    s = np.array([0.9, 0.8, 0.7, 0.2])
    y = np.array([False, True, False, True])  # the top score is a negative: precision 1 is impossible
    with pytest.raises(ObjectiveInfeasibleError, match="precision"):
        choose_binary(exact_sweep(s, y), parse_objective("recall_at_precision>=1.0"))


@pytest.mark.parametrize("text", ["auc", "recall_at_precision>=1.5", "precision_at_recall>0.9", "", "mcc>=0.5"])
def test_parse_objective_rejects_unknown(text: str) -> None:
    with pytest.raises(SweepError, match="objective"):
        parse_objective(text)


def test_stored_thresholds_lie_strictly_between_adjacent_scores() -> None:
    s, y = _binary_data(3, 500, decimals=2)
    curve = exact_sweep(s, y)
    finite = np.isfinite(curve.score)
    lower = np.r_[curve.score[finite][1:], -np.inf]
    assert np.all(curve.threshold[finite] <= curve.score[finite])
    assert np.all(curve.threshold[finite] > lower)
    assert np.all((curve.threshold >= 0) & (curve.threshold <= 1))


def test_one_class_only_is_a_clear_error(tmp_path: Path) -> None:
    d = _write_logits(tmp_path / "logits", 2, 50, 0)
    with np.load(d / "val_calib.npz") as data:
        np.savez(d / "val_calib.npz", logits=data["logits"], labels=np.zeros(50, dtype=np.int64))
    with pytest.raises(SweepError, match="only class 'class0'"):
        run(d, tmp_path / "out")


def test_all_scores_equal_gives_a_result_with_a_note(tmp_path: Path) -> None:
    d = _write_logits(tmp_path / "logits", 2, 50, 0)
    with np.load(d / "val_calib.npz") as data:
        np.savez(d / "val_calib.npz", logits=np.zeros((50, 2), np.float32), labels=data["labels"])
    result = run(d, tmp_path / "out", bootstrap=50)
    assert result.metrics["mcc"] == 0.0
    assert any("all val_calib scores are equal" in note for note in result.notes)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("target", [0.8, 0.9, 0.97])
def test_abstain_threshold_is_largest_coverage_meeting_target(seed: int, target: float) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 300)
    z = rng.normal(0, 1, (300, 4))
    z[np.arange(300), y] += 1.2
    probs = softmax(np.round(z * 3, 1))
    curve = risk_coverage(probs, y)
    best = choose_abstain(curve, target)
    top, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    brute = max(np.mean(top >= t) for t in np.unique(top) if np.mean(correct[top >= t]) >= target)
    assert curve.coverage[best] == pytest.approx(brute)
    accepted = top >= curve.threshold[best]
    assert np.mean(correct[accepted]) >= target


@pytest.mark.parametrize(("k", "quantise"), [(2, False), (2, True), (10, False), (10, True)])
def test_run_outputs_and_served_policy_reproduces_sweep(tmp_path: Path, k: int, quantise: bool) -> None:
    d = _write_logits(tmp_path / "logits", k, 400, seed=k, quantise=quantise)
    result = run(d, tmp_path / "out", target_selective_accuracy=0.9, bootstrap=200)
    for name in ("threshold.json", "curve.csv", "sweep.png", "summary.md"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    stored = json.loads((tmp_path / "out" / "threshold.json").read_text())
    assert stored["space"] == "raw" and stored["threshold"] == result.threshold
    assert result.ci_low <= result.objective_value <= result.ci_high or result.task == "multiclass"
    logits, _ = load_logits(d, "val_calib")
    raw = softmax(logits)
    served = apply_policy(policy_from_dict(stored["policy"]), raw, raw)
    np.testing.assert_array_equal(served.labels, result.decisions)
    # deterministic outputs
    run(d, tmp_path / "again", target_selective_accuracy=0.9, bootstrap=200)
    assert (tmp_path / "again" / "threshold.json").read_bytes() == (tmp_path / "out" / "threshold.json").read_bytes()


def test_curve_csv_has_one_row_per_candidate(tmp_path: Path) -> None:
    d = _write_logits(tmp_path / "logits", 2, 300, seed=1)
    run(d, tmp_path / "out", bootstrap=20)
    rows = (tmp_path / "out" / "curve.csv").read_text().strip().splitlines()
    logits, _ = load_logits(d, "val_calib")
    n_distinct = np.unique(softmax(logits)[:, 0]).size
    assert rows[0].startswith("threshold,score,tp,fp,tn,fn")
    assert len(rows) - 1 in (n_distinct, n_distinct + 1)


def test_load_logits_refuses_other_splits(tmp_path: Path) -> None:
    d = _write_logits(tmp_path / "logits", 2, 20, 0)
    with pytest.raises(LogitsError, match="split='train'"):
        load_logits(d, "train")


@pytest.mark.parametrize("k", [2, 5])
def test_sweep_html_embeds_the_decodable_plot_and_the_key_figures(tmp_path: Path, k: int) -> None:
    from PIL import Image

    d = _write_logits(tmp_path / "logits", k, 300, seed=20 + k)
    result = run(d, tmp_path / "out", target_selective_accuracy=0.8, bootstrap=30)
    page = (tmp_path / "out" / HTML_FILE).read_text()
    assert page == sweep_html(result, tmp_path / "out" / PLOT_FILE)  # what the component publishes
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 1
    png = base64.b64decode(uris[0], validate=True)
    assert png == (tmp_path / "out" / PLOT_FILE).read_bytes()
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size[0] > 100
    assert f"<td>{result.threshold:.6g} (raw probability space)</td>" in page
    assert f"<td>{result.objective_value:.4f}</td>" in page
    metric = "mcc" if k == 2 else "selective_accuracy"
    expected_row = (
        f"<td>{metric}</td><td>{result.metrics[metric]:.4g}</td><td>{result.metrics_val_test[metric]:.4g}</td>"
    )
    assert expected_row in page
