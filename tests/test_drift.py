"""Drift monitoring: the reference each bundle carries, the statistics, the null-calibrated alarms, logged bodies."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from images import png_b64
from PIL import Image
from scipy import stats

from visionpipe.monitoring import drift as D
from visionpipe.serving import bundle as B

UInt8 = npt.NDArray[np.uint8]


def _val_test(trained: Path) -> UInt8:
    """The val_test images of the Dataset the `candidate` bundle was validated on (the `trained` fixture's)."""
    from visionpipe.data.datasets import load_dataset

    return load_dataset(trained / "ds").split("val_test", "evaluate").images


# ---------------------------------------------------------------------------------------------- reference


def test_every_bundle_carries_a_signed_reference_of_what_it_serves(candidate: Path, trained: Path) -> None:
    from visionpipe.data.datasets import load_dataset

    assert D.REFERENCE_FILE == B.DRIFT_REFERENCE_FILE
    bundle = B.read_bundle(candidate)
    assert bundle.drift_reference == candidate / D.REFERENCE_FILE
    files = bundle.manifest["files"]
    assert isinstance(files, dict) and files[D.REFERENCE_FILE] == B.sha256_file(candidate / D.REFERENCE_FILE)
    ref = D.load_reference(candidate)
    val_test = load_dataset(trained / "ds").split("val_test", "evaluate")
    assert ref.source == "val_test" and ref.size == len(val_test.labels)
    assert ref.classes == bundle.classes and ref.bundle_version == bundle.version
    assert (candidate / D.REFERENCE_FILE).stat().st_size < 300_000
    # exactly what the served bundle answers on val_test, and the images' own statistics
    served = B.BundleModel(bundle).predict_images(val_test.images)
    np.testing.assert_allclose(ref.confidence, served.calibrated_probs.max(axis=1), atol=6e-7)
    np.testing.assert_array_equal(ref.predicted, served.decisions.labels)
    np.testing.assert_allclose(ref.inputs["input_mean"], val_test.images.mean(axis=(1, 2, 3)) / 255, atol=6e-6)
    assert ref.embedding.shape == (ref.size, D.EMBED_DIMS) and ref.score is None
    report = (candidate / "reports" / "validation.md").read_text()
    assert "| drift_reference | pass |" in report


def test_binary_bundle_reference_holds_the_positive_score(half_candidate: Path) -> None:
    ref = D.load_reference(half_candidate)
    assert ref.positive_class == "eight" and ref.score is not None
    assert np.all((ref.score >= 0) & (ref.score <= 1))
    monitor = D.DriftMonitor(ref, window=16, n_null=200)
    assert {("score", "ks"), ("score", "psi")} <= {(s.feature, s.test) for s in monitor.report()}


def test_tampered_reference_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(candidate, root)
    path = root / D.REFERENCE_FILE
    data = json.loads(path.read_text())
    data["confidence"][0] = 0.123
    path.write_text(json.dumps(data))
    with pytest.raises(B.ChecksumMismatch):
        B.read_bundle(root)
    with pytest.raises(D.DriftError, match=r"\[checksum_mismatch\]"):
        D.load_reference(root)


def test_bundle_without_reference_is_a_named_error(candidate: Path, tmp_path: Path) -> None:
    manifest = {k: v for k, v in json.loads((candidate / B.BUNDLE_FILE).read_text()).items() if k != "files"}
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    old = tmp_path / "old"
    B.write_bundle(old, manifest, [candidate / "weights" / "member-0.safetensors"], card)
    assert B.read_bundle(old).drift_reference is None  # still a valid bundle: it just cannot be monitored
    with pytest.raises(D.DriftError, match=r"lists no drift_reference\.json"):
        D.load_reference(old)
    with pytest.raises(D.DriftError, match=r"no drift_reference\.json"):
        D.load_reference(old, verify=False)
    with pytest.raises(D.DriftError, match="format"):
        D.DriftReference.from_json('{"format": "other"}')
    with pytest.raises(D.DriftError, match="confidence"):
        text = (candidate / D.REFERENCE_FILE).read_text()
        broken = json.loads(text)
        broken["confidence"] = broken["confidence"][:-1]
        D.DriftReference.from_json(json.dumps(broken))


# --------------------------------------------------------------------------------------------- statistics


def test_ks_equals_scipy_including_ties() -> None:
    rng = np.random.default_rng(1)
    for _ in range(20):
        a = np.round(rng.normal(size=rng.integers(5, 300)), 1)
        b = np.round(rng.normal(0.2, 1.3, size=rng.integers(5, 300)), 1)
        assert D.ks_statistic(a, b) == pytest.approx(stats.ks_2samp(a, b).statistic, abs=1e-12)


def test_psi_ks_mmd_are_zero_on_identical_samples_and_grow_with_the_shift() -> None:
    rng = np.random.default_rng(2)
    ref = rng.normal(size=2000)
    edges = D.psi_edges(ref)
    expected = D.proportions(ref, edges)
    assert D.psi(expected, D.proportions(ref, edges)) == pytest.approx(0.0, abs=1e-12)
    assert D.ks_statistic(ref, ref) == 0.0
    live = rng.normal(size=500)
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
    psis = [D.psi(expected, D.proportions(live + s, edges)) for s in shifts]
    kss = [D.ks_statistic(ref, live + s) for s in shifts]
    assert psis == sorted(psis) and psis[-1] > 1.0 and psis[0] < 0.05
    assert kss == sorted(kss) and kss[-1] > 0.6
    x = rng.normal(size=(300, 8))
    sigma2 = D.median_bandwidth(x)
    y = rng.normal(size=(200, 8))
    mmds = [D.mmd2_unbiased(x, y + s, sigma2) for s in shifts]
    assert abs(mmds[0]) < 0.01 and mmds == sorted(mmds) and mmds[-1] > 0.2
    assert D.mmd2_unbiased(x, x, sigma2) < 0  # unbiased: the diagonal is left out, identical samples go below 0
    counts = D.category_proportions(np.array([-1, 0, 0, 1]), 2)
    np.testing.assert_allclose(counts, [0.25, 0.5, 0.25], atol=1e-3)


# ------------------------------------------------------------------------------------------------- alarms


@pytest.fixture(scope="module")
def mnist(candidate: Path, mnist_train_dir: Path) -> tuple[D.DriftReference, dict[str, npt.NDArray[np.generic]]]:
    """Real digits through the candidate bundle: a reference from 1,200 mnist-5k-train images and 1,800 held-out
    others (neither in the reference nor in the bundle's training data, which is sklearn's digits)."""
    rng = np.random.default_rng(0)
    files = sorted(mnist_train_dir.glob("*/*.png"))
    pick = rng.choice(len(files), size=3000, replace=False)
    images = np.stack([np.asarray(Image.open(files[i]).convert("L"), dtype=np.uint8)[..., None] for i in pick])
    bundle = B.read_bundle(candidate)
    served = B.BundleModel(bundle).predict_images(images)
    ref = D.build_reference(
        images[:1200],
        served.calibrated_probs[:1200],
        served.decisions.labels[:1200],
        classes=bundle.classes,
        positive_class=None,
        preprocessing=bundle.preprocess,
        bundle_version=bundle.version,
        source="mnist-5k-train sample (test)",
    )
    held = {
        "images": images[1200:],
        "probs": served.calibrated_probs[1200:],
        "labels": served.decisions.labels[1200:],
    }
    return ref, held


def _window_alarms(
    monitor: D.DriftMonitor, images: UInt8, probs: npt.NDArray[np.float64], labels: npt.NDArray[np.int64]
) -> list[D.DriftStat]:
    monitor.reset()
    monitor.observe(list(images), probs.max(axis=1), labels)
    return [s for s in monitor.report() if s.alarm]


def test_false_alarm_rate_on_held_out_windows_is_bounded_and_inverted_digits_alarm(
    mnist: tuple[D.DriftReference, dict[str, npt.NDArray[np.generic]]], candidate: Path
) -> None:
    ref, held = mnist
    rate, window, windows = 0.05, 48, 150
    monitor = D.DriftMonitor(ref, window=window, false_alarm_rate=rate, seed=0)
    assert len(monitor.tests) == 9 and monitor.per_test_rate == pytest.approx(rate / 9)
    images = np.asarray(held["images"], dtype=np.uint8)
    probs = np.asarray(held["probs"], dtype=np.float64)
    labels = np.asarray(held["labels"], dtype=np.int64)
    rng = np.random.default_rng(5)
    alarmed = 0
    for _ in range(windows):
        idx = rng.choice(len(images), size=window, replace=False)
        alarmed += bool(_window_alarms(monitor, images[idx], probs[idx], labels[idx]))
    # the windows overlap a little (48 of 1,800 images each); a binomial bound at the 0.999 level on the target
    bound = stats.binom.ppf(0.999, windows, rate)
    assert alarmed <= bound, f"{alarmed}/{windows} in-distribution windows alarmed (bound {bound:.0f})"
    # a half-full window never alarms, even when it is shifted
    inverted = (255 - images).astype(np.uint8)
    runtime = B.BundleModel(B.read_bundle(candidate))
    served = runtime.predict_images(inverted[: window * 3])
    monitor.reset()
    monitor.observe(
        list(inverted[: window // 2]),
        served.calibrated_probs[: window // 2].max(axis=1),
        served.decisions.labels[: window // 2],
    )
    assert not any(s.alarm for s in monitor.report())
    detected = 0
    for k in range(3):
        sl = slice(k * window, (k + 1) * window)
        hits = _window_alarms(monitor, inverted[sl], served.calibrated_probs[sl], served.decisions.labels[sl])
        names = {(s.feature, s.test) for s in hits}
        detected += ("input_mean", "ks") in names and ("embedding", "mmd") in names
    assert detected == 3


# ------------------------------------------------------------------------------------------- logged bodies


@pytest.fixture(scope="module")
def predictor(candidate: Path) -> object:
    from visionpipe.serving.predictor import VisionPredictor

    model = VisionPredictor("digits", [str(candidate)])
    model.load()
    return model


def _answer(predictor: object, body: dict[str, object]) -> dict[str, object]:
    """The JSON answer the KServe dataplane sends for `body` (v1 dict, or v2 REST parsed as the dataplane does)."""
    from kserve.protocol.infer_type import InferRequest
    from kserve.protocol.rest.v2_datamodels import InferenceRequest, InferenceResponse

    from visionpipe.serving.predictor import VisionPredictor

    assert isinstance(predictor, VisionPredictor)
    payload: dict[str, object] | InferRequest = body
    if "inputs" in body:  # kserve/protocol/dataplane.py decode: InferenceRequest -> InferRequest
        payload = InferRequest.from_inference_request(InferenceRequest.model_validate(body), "digits")
    batch = predictor.decode(payload)
    answers = predictor.infer(batch)
    out = asyncio.run(predictor.postprocess(answers))
    if isinstance(out, dict):
        return json.loads(json.dumps(out))
    rest, _ = out.to_rest()  # kserve/protocol/dataplane.py encode, then v2_endpoints.infer validates and serialises
    return json.loads(InferenceResponse.model_validate(rest).model_dump_json())


def test_observe_event_reads_v1_and_v2_bodies_as_the_predictor_answers_them(
    candidate: Path, trained: Path, predictor: object
) -> None:
    ref = D.load_reference(candidate)
    images = _val_test(trained)[:16]
    v1 = {"instances": [{"b64": png_b64(img)} for img in images[:4]]}
    v2_png = {
        "inputs": [{"name": "image", "shape": [4], "datatype": "BYTES", "data": [png_b64(i) for i in images[4:8]]}]
    }
    pix = images[8:12]
    v2_pixels = {
        "inputs": [{"name": "pixels", "shape": list(pix.shape), "datatype": "FP32", "data": pix.reshape(-1).tolist()}],
        "outputs": [{"name": "probabilities"}, {"name": "label"}],
    }
    uint8 = images[12:16, :, :, 0]  # [N, H, W] UINT8, answered with the JSON records only
    v2_result = {
        "inputs": [{"name": "pixels_uint8", "shape": list(uint8.shape), "datatype": "UINT8", "data": uint8.tolist()}],
        "outputs": [{"name": "result"}],
    }
    via_events = D.DriftMonitor(ref, window=16, n_null=100)
    for body in (v1, v2_png, v2_pixels, v2_result):
        assert via_events.observe_event(body, _answer(predictor, body)) == 4
    direct = D.DriftMonitor(ref, window=16, n_null=100)
    served = B.BundleModel(B.read_bundle(candidate)).predict_images(images)
    direct.observe(list(images), served.calibrated_probs.max(axis=1), served.decisions.labels)
    for a, b in zip(via_events.report(), direct.report(), strict=True):
        assert (a.feature, a.test, a.window) == (b.feature, b.test, 16)
        assert a.value == pytest.approx(b.value, abs=1e-5), a
        assert a.threshold == b.threshold


@pytest.mark.parametrize(
    ("request_body", "response_body", "match"),
    [
        ({}, {"predictions": []}, "neither"),
        ({"instances": "x"}, {"predictions": []}, "instances"),
        ({"instances": [{"b64": "!!not base64"}]}, {"predictions": [{"label": 1, "confidence": 0.9}]}, "base64"),
        ({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES"}]}, {"outputs": []}, "lacks data"),
        ({"inputs": [{"name": "p", "shape": [1, 2, 2], "datatype": "FP32", "data": [1, 2, 3]}]}, {}, "shape"),
        ("OK", {}, "JSON objects"),
    ],
)
def test_observe_event_refuses_unreadable_requests(
    candidate: Path, request_body: object, response_body: dict[str, object], match: str
) -> None:
    monitor = D.DriftMonitor(D.load_reference(candidate), window=8, n_null=50)
    with pytest.raises(D.DriftError, match=match):
        monitor.observe_event(request_body, response_body)  # type: ignore[arg-type]  # garbage on purpose
    assert monitor.observations == 0


def test_observe_event_refuses_unreadable_responses(candidate: Path, trained: Path) -> None:
    monitor = D.DriftMonitor(D.load_reference(candidate), window=8, n_null=50)
    image = _val_test(trained)[0]
    request = {"instances": [{"b64": png_b64(image)}]}
    for response, match in [
        ({"predictions": [{"label": 1, "confidence": 0.9}] * 2}, "1 image"),
        ({"predictions": [{"label": 42, "confidence": 0.9}]}, "label 42"),
        ({"predictions": [{"label": 1}]}, "confidence"),
        ({"outputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [1]}]}, "needs label and"),
        ({"outputs": [{"name": "label", "shape": [1], "datatype": "INT64"}]}, "binary"),
        ({"nothing": 1}, "neither"),
    ]:
        with pytest.raises(D.DriftError, match=match):
            monitor.observe_event(request, response)
    assert monitor.observations == 0
