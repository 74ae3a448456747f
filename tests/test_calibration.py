"""Tests of visionpipe/serving/calibrators.py (with their fitting, visionpipe/phases/calibrators_fit.py),
visionpipe/serving/metrics.py, visionpipe/phases/conformal.py and visionpipe/phases/calibration.py."""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import matthews_corrcoef

from visionpipe.data.logits import load_logits
from visionpipe.phases.calibration import HTML_FILE, PLOT_FILE, CalibrationPhaseError, reliability_html
from visionpipe.phases.calibration import run as calibrate_run
from visionpipe.phases.calibrators_fit import fit_calibrator, fit_temperature
from visionpipe.phases.conformal import ConformalError, conformal_quantile, fit_conformal, fit_scrc
from visionpipe.phases.threshold_sweep import run as sweep_run
from visionpipe.serving.calibrators import (
    CALIBRATION_METHODS,
    CalibratorError,
    calibrator_from_dict,
)
from visionpipe.serving.metrics import binary_metrics_from_counts, brier, ece, mcc, nll, softmax
from visionpipe.serving.policies import apply_policy, conformal_sets, policy_from_dict


def _true_logits(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the exact label distribution (perfectly calibrated), and sampled labels."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p = softmax(z)
    labels = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(labels, k - 1)


def _write_logits(path: Path, k: int, n: int, seed: int, overconfidence: float = 2.5) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for i, split in enumerate(("val_calib", "val_test")):
        z, y = _true_logits(n, k, seed + i)
        np.savez(path / f"{split}.npz", logits=(z * overconfidence).astype(np.float32), labels=y.astype(np.int64))
    classes = [f"c{i}" for i in range(k)]
    (path / "meta.json").write_text(json.dumps({"classes": classes, "positive_class": "c1" if k == 2 else None}))
    return path


# ------------------------------------------------------------------------------------------ metrics
def test_binary_metrics_match_sklearn_and_handle_zero_division() -> None:
    rng = np.random.default_rng(0)
    y, p = rng.random(300) < 0.4, rng.random(300) < 0.5
    assert mcc(y, p) == pytest.approx(matthews_corrcoef(y, p))
    zero = binary_metrics_from_counts(0, 0, 10, 0)
    assert zero["precision"] == 0.0 and zero["mcc"] == 0.0 and zero["recall"] == 0.0


def test_calibration_metrics_on_known_cases() -> None:
    probs = np.array([[0.8, 0.2], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2], [0.8, 0.2]])
    labels = np.array([0, 0, 0, 0, 1])  # 80% right at confidence 0.8: perfectly calibrated
    assert ece(probs, labels) == pytest.approx(0.0, abs=1e-12)
    assert ece(probs, labels, binning="mass") == pytest.approx(0.0, abs=1e-12)
    assert nll(probs, labels) == pytest.approx(-(4 * np.log(0.8) + np.log(0.2)) / 5)
    assert brier(probs, labels) == pytest.approx((4 * 2 * 0.04 + 2 * 0.64) / 5)


# -------------------------------------------------------------------------------------- calibrators
@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.0, 3.0])
def test_temperature_scaling_recovers_a_known_temperature(true_t: float) -> None:
    z, y = _true_logits(20000, 5, seed=1)
    fitted = fit_temperature(5, z * true_t, y)
    assert fitted.temperature == pytest.approx(true_t, rel=0.05)


@pytest.mark.parametrize(
    ("k", "method"), [(2, m) for m in CALIBRATION_METHODS if m != "identity"] + [(6, "temperature")]
)
@pytest.mark.parametrize("distortion", [0.3, 3.0])
def test_every_calibrator_lowers_held_out_nll(k: int, method: str, distortion: float) -> None:
    z, y = _true_logits(6000, k, seed=2)
    shift = 0.0 if method == "temperature" else 0.8  # a bias only the binary score maps can undo
    bad = z * distortion + shift * np.eye(k)[0]
    fit_idx, test_idx = np.arange(3000), np.arange(3000, 6000)
    cal = fit_calibrator(method, k, bad[fit_idx], y[fit_idx])
    before = nll(softmax(bad[test_idx]), y[test_idx])
    after = nll(cal.probabilities(bad[test_idx]), y[test_idx])
    assert after < before - 0.01


@pytest.mark.parametrize(("k", "method"), [(2, m) for m in CALIBRATION_METHODS] + [(7, "identity"), (7, "temperature")])
def test_probabilities_are_rows_summing_to_one_and_survive_json(k: int, method: str) -> None:
    z, y = _true_logits(500, k, seed=3)
    cal = fit_calibrator(method, k, z * 2, y, positive_index=0 if k == 2 else 1)
    probs = cal.probabilities(z)
    assert probs.shape == (500, k)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-12)
    assert np.all((probs >= 0) & (probs <= 1))
    d = json.loads(json.dumps(cal.to_dict()))
    assert d["method"] == method
    np.testing.assert_array_equal(calibrator_from_dict(d).probabilities(z), probs)
    if k == 2:  # the positive-score map agrees with the probabilities and is monotone
        pos = cal.positive_index
        mapped = cal.positive_map(softmax(z)[:, pos])
        np.testing.assert_allclose(mapped, probs[:, pos], atol=1e-9)
        grid = np.linspace(0, 1, 1001)
        assert np.all(np.diff(cal.positive_map(grid)) >= -1e-15)


@pytest.mark.parametrize(
    ("d", "match"),
    [
        ({"method": "vector"}, "method='vector'"),
        ({"method": "temperature", "n_classes": 3, "positive_index": 1}, r"missing parameter\(s\) \['temperature'\]"),
        ({"method": "temperature", "n_classes": 3, "positive_index": 1, "temperature": -1.0}, "temperature=-1.0"),
        ({"method": "isotonic", "n_classes": 3, "positive_index": 1, "x": [0.0], "y": [0.0]}, "binary task"),
        (
            {"method": "isotonic", "n_classes": 2, "positive_index": 1, "x": [0.0, 1.0], "y": [1.0, 0.0]},
            "non-decreasing",
        ),
        ({"method": "platt", "n_classes": 2, "positive_index": 1, "a": "x", "b": 0.0}, "must be a number"),
    ],
)
def test_calibrator_from_dict_rejects_invalid(d: dict[str, object], match: str) -> None:
    with pytest.raises(CalibratorError, match=match):
        calibrator_from_dict(d)


# ---------------------------------------------------------------------------------------- conformal
@pytest.mark.parametrize("method", ["lac", "aps", "raps"])
def test_split_conformal_coverage_is_within_the_finite_sample_band(method: str) -> None:
    alpha, n_cal, n_test, repeats = 0.1, 300, 700, 300
    z, y = _true_logits(n_cal + n_test, 5, seed=4)
    probs = softmax(z)
    rng = np.random.default_rng(5)
    coverages = []
    for _ in range(repeats):
        perm = rng.permutation(len(y))
        cal, test = perm[:n_cal], perm[n_cal:]
        config = fit_conformal(probs[cal], y[cal], alpha, method)
        mask = conformal_sets(probs[test], config)
        coverages.append(np.mean(mask[np.arange(n_test), y[test]]))
    mean = float(np.mean(coverages))
    mc_error = 3 * float(np.std(coverages)) / np.sqrt(repeats)
    assert 1 - alpha - mc_error <= mean <= 1 - alpha + 1 / (n_cal + 1) + mc_error


def test_conformal_quantile_is_the_finite_sample_order_statistic() -> None:
    scores = np.arange(1, 20, dtype=float)  # n = 19
    assert conformal_quantile(scores, 0.1) == 18.0  # ceil(20 * 0.9) = 18th smallest
    with pytest.raises(ConformalError, match="too small"):
        conformal_quantile(scores[:5], 0.1)


@pytest.mark.parametrize(("k", "alpha", "delta"), [(2, 0.05, 0.1), (2, 0.1, 0.2), (4, 0.1, 0.1)])
def test_scrc_keeps_the_selected_risk_below_alpha(k: int, alpha: float, delta: float) -> None:
    """Fresh calibration sets; the selected risk is computed exactly on a large test pool, since the
    synthetic probabilities are the true label distribution: risk(x) = 1 - sum of p(y | x) over the set."""
    n_cal, repeats, rate = 1000, 100, 0.8
    z_pool, _ = _true_logits(20000, k, seed=6)
    pool = softmax(z_pool)
    risks, rates = [], []
    for rep in range(repeats):
        z, y = _true_logits(n_cal, k, seed=1000 + rep)
        policy = fit_scrc(softmax(z), y, alpha, delta, rate).policy
        out = apply_policy(policy, pool, pool)
        selected = pool.max(axis=1) >= policy.selection_threshold
        risk_x = 1.0 - np.sum(pool * out.set_mask, axis=1)
        risks.append(float(np.mean(risk_x[selected])))
        rates.append(float(np.mean(selected)))
    assert np.mean(risks) <= alpha
    assert np.mean(np.array(risks) > alpha) <= delta + 0.1  # PAC level delta, up to Monte-Carlo error
    assert np.mean(rates) == pytest.approx(rate, abs=0.02)


# ------------------------------------------------------------------------------------ the phase core
@pytest.mark.parametrize("method", ["auto", "temperature", "platt", "beta", "isotonic"])
def test_stored_policy_reproduces_the_sweep_on_val_calib(tmp_path: Path, method: str) -> None:
    logits_dir = _write_logits(tmp_path / "logits", 2, 600, seed=8)
    sweep = sweep_run(logits_dir, tmp_path / "decision", bootstrap=50)
    result = calibrate_run(logits_dir, tmp_path / "decision", tmp_path / "cal", calibration_method=method)
    stored = json.loads((tmp_path / "cal" / "calibration.json").read_text())
    assert stored["calibrator"]["method"] == result.method
    assert method == "auto" or result.method == method
    calibrator = calibrator_from_dict(stored["calibrator"])
    policy = policy_from_dict(stored["policy"])
    logits, _ = load_logits(logits_dir, "val_calib")
    served = apply_policy(policy, calibrator.probabilities(logits), softmax(logits))
    np.testing.assert_array_equal(served.labels, sweep.decisions)
    threshold_space = stored["policy"]["policies"]["threshold"]["space"]
    assert threshold_space == ("raw" if result.method == "isotonic" else "calibrated")
    assert stored["metrics"]["val_test"]["after"]["nll"] < stored["metrics"]["val_test"]["before"]["nll"]


def test_multiclass_run_writes_deterministic_outputs(tmp_path: Path) -> None:
    logits_dir = _write_logits(tmp_path / "logits", 6, 500, seed=9)
    sweep = sweep_run(logits_dir, tmp_path / "decision", target_selective_accuracy=0.8, bootstrap=50)
    result = calibrate_run(logits_dir, tmp_path / "decision", tmp_path / "a", alpha=0.1, conformal_score="raps")
    calibrate_run(logits_dir, tmp_path / "decision", tmp_path / "b", alpha=0.1, conformal_score="raps")
    for name in ("calibration.json", "reliability.png", "summary.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes() or name.endswith("png")
    assert result.method == "temperature"
    assert result.calibrator.to_dict()["temperature"] == pytest.approx(2.5, rel=0.15)
    logits, _ = load_logits(logits_dir, "val_calib")
    served = apply_policy(result.policy, result.calibrator.probabilities(logits), softmax(logits))
    np.testing.assert_array_equal(served.labels, sweep.decisions)
    assert result.conformal_config.method == "raps"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"calibration_method": "vector"}, "calibration_method='vector'"),
        ({"calibration_method": "isotonic"}, "not available for K=4"),
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"conformal_score": "naive"}, "conformal_score='naive'"),
        ({"active_policy": "both"}, "active_policy='both'"),
    ],
)
def test_calibration_rejects_bad_parameters(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    logits_dir = _write_logits(tmp_path / "logits", 4, 200, seed=10)
    sweep_run(logits_dir, tmp_path / "decision", target_selective_accuracy=0.5, bootstrap=10)
    with pytest.raises(CalibrationPhaseError, match=match):
        calibrate_run(logits_dir, tmp_path / "decision", tmp_path / "cal", **kwargs)  # type: ignore[arg-type]


def test_reliability_html_embeds_the_decodable_diagram_and_the_key_figures(tmp_path: Path) -> None:
    from PIL import Image

    logits_dir = _write_logits(tmp_path / "logits", 2, 400, seed=12)
    sweep_run(logits_dir, tmp_path / "decision", bootstrap=20)
    result = calibrate_run(logits_dir, tmp_path / "decision", tmp_path / "cal", calibration_method="temperature")
    page = (tmp_path / "cal" / HTML_FILE).read_text()
    assert page == reliability_html(result, tmp_path / "cal" / PLOT_FILE)  # what the component publishes
    uris = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) == 1
    png = base64.b64decode(uris[0], validate=True)
    assert png == (tmp_path / "cal" / PLOT_FILE).read_bytes()
    with Image.open(io.BytesIO(png)) as image:
        assert image.format == "PNG" and image.size[0] > 100
    for split in ("val_calib", "val_test"):
        for stage in ("before", "after"):
            m = result.metrics[split][stage]
            assert f"<td>{split}</td><td>{stage}</td><td>{m['ece']:.4f}</td><td>{m['brier']:.4f}</td>" in page
    aps = result.conformal_val_test["aps"]
    assert f"<td>aps</td><td>{aps['coverage']:.4f}</td><td>0.9000</td>" in page
    assert "Calibration: temperature (requested temperature)" in page


# ----------------------------------------------------------------------------------------- kfp.local
def test_components_run_under_kfp_local(tmp_path: Path) -> None:
    from kfp import dsl, local

    from visionpipe.kfp.components.calibration import calibrate
    from visionpipe.kfp.components.threshold_sweep import threshold_sweep

    logits_dir = _write_logits(tmp_path / "logits", 2, 300, seed=11)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"))

    @dsl.pipeline(name="decision-phases")  # type: ignore[untyped-decorator]
    def decision_phases(logits_uri: str) -> None:
        logits = dsl.importer(artifact_uri=logits_uri, artifact_class=dsl.Artifact, reimport=False)
        sweep = threshold_sweep(logits=logits.output, bootstrap=50)
        calibrate(logits=logits.output, decision=sweep.outputs["decision"], calibration_method="temperature")

    decision_phases(logits_uri=str(logits_dir))
    written = {p.name for p in (tmp_path / "root").rglob("*") if p.is_file()}
    assert {"threshold.json", "curve.csv", "calibration.json", "reliability.png"} <= written
    for output in ("sweep_plot", "reliability_diagram"):  # the dsl.HTML outputs the Kubeflow UI renders
        page = next((tmp_path / "root").rglob(output)).read_text()
        assert page.startswith("<!DOCTYPE html>") and 'src="data:image/png;base64,' in page
    cal_json = next((tmp_path / "root").rglob("calibration.json"))
    assert json.loads(cal_json.read_text())["calibrator"]["method"] == "temperature"


def test_serving_calibrators_hold_no_fitting() -> None:
    """Fitting is training-side code (visionpipe/phases/calibrators_fit.py): serving rebuilds, applies, serialises."""
    import visionpipe.serving.calibrators as served

    assert not hasattr(served, "make_calibrator")
    for cls in (served.IdentityCalibrator, served.TemperatureCalibrator, served.IsotonicCalibrator):
        assert not hasattr(cls, "fit")
    source = Path(served.__file__).read_text()
    assert "import scipy" not in source and "from scipy" not in source and "from sklearn" not in source


def test_fit_calibrator_refuses_an_unknown_method_naming_the_allowed_ones() -> None:
    z, y = _true_logits(50, 2, seed=4)
    with pytest.raises(CalibratorError, match=r"method='vector' is not one of \('identity', 'temperature'"):
        fit_calibrator("vector", 2, z, y)
    with pytest.raises(CalibratorError, match="needs a binary task"):
        fit_calibrator("platt", 3, *_true_logits(50, 3, seed=4))
