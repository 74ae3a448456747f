"""Property tests of randomized APS (Romano, Sesia & Candes 2020), its conservative variant, and SCRC's empty-set
rule, on real probabilities: a linear discriminant's out-of-fold softmax on scikit-learn's built-in digits
(1,797 real 8x8 images, two-fold cross-fitting, so no probability comes from a model that saw its image).

Each coverage figure is a mean over many random calibration / test splits of the same probabilities, compared
with the split-conformal band [1 - alpha, 1 - alpha + 1 / (n + 1)] widened by 3 Monte-Carlo standard errors.
"""

from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.datasets import load_digits
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.model_selection import StratifiedKFold

from visionpipe.phases.conformal import fit_conformal, fit_scrc, scrc_report, set_report
from visionpipe.serving.policies import aps_u, conformal_sets

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
SPLITS = 200
N_CAL = 800


@pytest.fixture(scope="module")
def digits_probs() -> tuple[FloatArray, IntArray]:
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    probs = np.zeros((len(y), 10))
    for train, held in StratifiedKFold(2, shuffle=True, random_state=0).split(x, y):
        model = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=0.1).fit(x[train], y[train])
        probs[held] = model.predict_proba(x[held])
    return probs, y.astype(np.int64)


def _splits(n: int, seed: int = 0) -> list[tuple[IntArray, IntArray]]:
    rng = np.random.default_rng(seed)
    perms = [rng.permutation(n) for _ in range(SPLITS)]
    return [(perm[:N_CAL], perm[N_CAL:]) for perm in perms]


def _reports(probs: FloatArray, y: IntArray, method: str, alpha: float) -> dict[str, FloatArray]:
    rows = []
    for cal, test in _splits(len(y)):
        config = fit_conformal(probs[cal], y[cal], alpha, method)
        rows.append(set_report(conformal_sets(probs[test], config), y[test]))
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


def test_the_probabilities_are_real_and_sum_to_one(digits_probs: tuple[FloatArray, IntArray]) -> None:
    probs, y = digits_probs
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(probs >= 0)
    accuracy = float(np.mean(probs.argmax(axis=1) == y))
    assert 0.9 < accuracy < 0.99  # a real, imperfect model: sets of more than one class are needed


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
def test_randomized_aps_covers_and_the_bound_is_tight(digits_probs: tuple[FloatArray, IntArray], alpha: float) -> None:
    probs, y = digits_probs
    rep = _reports(probs, y, "aps", alpha)
    mean, mc = rep["coverage"].mean(), 3 * rep["coverage"].std() / np.sqrt(SPLITS)
    assert mean >= 1 - alpha - mc
    assert mean <= 1 - alpha + 1 / (N_CAL + 1) + mc  # exact, not conservative: randomization breaks the ties


def test_conservative_aps_over_covers_and_never_empties(digits_probs: tuple[FloatArray, IntArray]) -> None:
    probs, y = digits_probs
    alpha = 0.1
    conservative = _reports(probs, y, "aps-conservative", alpha)
    randomized = _reports(probs, y, "aps", alpha)
    assert conservative["coverage"].mean() > 1 - alpha + 1 / (N_CAL + 1) + 0.02  # over-covers, by design
    assert conservative["empty_rate"].max() == 0.0
    assert conservative["mean_set_size"].mean() > randomized["mean_set_size"].mean()
    cal, test = _splits(len(y))[0]
    fitted = fit_conformal(probs[cal], y[cal], alpha, "aps-conservative")
    assert fitted.qhat == fit_conformal(probs[cal], y[cal], alpha, "aps").qhat  # the same fit, another set
    wide = conformal_sets(probs[test], fitted)
    narrow = conformal_sets(probs[test], replace(fitted, method="aps"))
    assert np.all(wide >= narrow) and np.any(wide > narrow)  # contains the randomized set


def test_randomized_aps_empties_only_where_the_rule_allows(digits_probs: tuple[FloatArray, IntArray]) -> None:
    """Romano's set is empty exactly when u * p_top > qhat (the rule allows it, as MAPIE's "randomized" does)."""
    probs, y = digits_probs
    for cal, test in _splits(len(y))[:20]:
        config = fit_conformal(probs[cal], y[cal], 0.1, "aps")
        empty = conformal_sets(probs[test], config).sum(axis=1) == 0
        allowed = aps_u(probs[test]) * probs[test].max(axis=1) > config.qhat
        np.testing.assert_array_equal(empty, allowed)


def test_mean_set_size_matches_mapie(digits_probs: tuple[FloatArray, IntArray]) -> None:
    mapie = pytest.importorskip("mapie.classification")
    probs, y = digits_probs
    alpha = 0.1
    table = _ProbabilityTable(probs)
    ours, theirs = [], []  # (randomized, conservative) mean set size per split
    for i, (cal, test) in enumerate(_splits(len(y))):
        config = fit_conformal(probs[cal], y[cal], alpha, "aps")
        ours.append(
            [
                conformal_sets(probs[test], c).sum(axis=1).mean()
                for c in (config, replace(config, method="aps-conservative"))
            ]
        )
        model = mapie.SplitConformalClassifier(
            table, confidence_level=1 - alpha, conformity_score="aps", prefit=True, random_state=i
        )
        model.conformalize(cal[:, None], y[cal])
        sizes = []
        for last in ("randomized", True):
            _, sets = model.predict_set(test[:, None], conformity_score_params={"include_last_label": last})
            sizes.append(sets[:, :, 0].sum(axis=1).mean())
        theirs.append(sizes)
    mean_ours, mean_theirs = np.mean(ours, axis=0), np.mean(theirs, axis=0)
    assert mean_ours[0] == pytest.approx(mean_theirs[0], rel=0.05)  # randomized vs include_last_label="randomized"
    assert mean_ours[1] == pytest.approx(mean_theirs[1], rel=0.05)  # conservative vs include_last_label=True


def test_scrc_decision_rate_does_not_fall_as_alpha_rises(digits_probs: tuple[FloatArray, IntArray]) -> None:
    """With empty_set="top1" the decision rate is non-decreasing in alpha (the old "abstain" rule falls on the
    same probabilities), and the selected risk stays <= alpha on average over random splits."""
    probs, y = digits_probs
    alphas = [0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3]
    rng = np.random.default_rng(1)
    for rule in ("top1", "abstain"):
        rates, risks = [], []
        for _ in range(20):
            perm = rng.permutation(len(y))
            cal, test = perm[:900], perm[900:]
            reps = [
                scrc_report(fit_scrc(probs[cal], y[cal], a, 0.1, 0.9, empty_set=rule).policy, probs[test], y[test])
                for a in alphas
            ]
            rates.append([r["decision_rate"] for r in reps])
            risks.append([r["selected_risk"] for r in reps])
        rate = np.array(rates)
        if rule == "top1":
            assert np.all(np.diff(rate, axis=1) >= 0)  # every split, every step of the grid
            assert np.all(np.mean(risks, axis=0) <= np.array(alphas))
        else:
            assert rate.mean(axis=0)[-1] < rate.mean(axis=0).max() - 0.05  # the behaviour the rule removes


class _ProbabilityTable(ClassifierMixin, BaseEstimator):  # type: ignore[misc]  # sklearn ships no types
    """A prefit 'classifier' whose feature is a row index into fixed probabilities, so MAPIE scores the very
    probabilities we score (MAPIE calls predict_proba; there is nothing to fit)."""

    def __init__(self, probs: FloatArray) -> None:
        self.probs = probs
        self.classes_ = np.arange(probs.shape[1])
        self.n_features_in_ = 1

    def fit(self, x: FloatArray, y: IntArray) -> "_ProbabilityTable":
        return self

    def predict_proba(self, x: FloatArray) -> FloatArray:
        return self.probs[np.asarray(x)[:, 0].astype(np.int64)]

    def predict(self, x: FloatArray) -> IntArray:
        out: IntArray = self.predict_proba(x).argmax(axis=1)
        return out
