"""The KServe predictor behind KServe's real ModelServer on 127.0.0.1: v1, v2 (REST and gRPC, with the
independent tritonclient library), TTA, ensembles, both preprocessing paths, and bad inputs answered with
named 4xx errors while the server keeps serving."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visionpipe.data.datasets import load_dataset
from visionpipe.harness import ServerProcess, free_port, running_server
from visionpipe.serving import bundle as B
from visionpipe.serving.predictor import EnsembleError, VisionPredictor
from visionpipe.specs import PreprocessSpec

tritonhttp = pytest.importorskip("tritonclient.http")


JSON = {"Content-Type": "application/json"}


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[2] == 1 else array).save(buf, format=fmt)
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _variant(candidate: Path, out: Path, kind: str) -> Path:
    """The candidate re-written as a bundle with another preprocessing kind (same weights)."""
    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    spec = PreprocessSpec.from_dict(manifest["preprocessing"]["spec"])
    spec = PreprocessSpec(kind=kind, channels=spec.channels, size=spec.size, mean=spec.mean, std=spec.std)
    manifest["preprocessing"] = {"spec": spec.to_dict(), "signature": spec.signature}
    manifest.pop("files")
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    B.write_bundle(out, manifest, [candidate / "weights" / "member-0.safetensors"], card)
    return out


@pytest.fixture(scope="module")
def upload_bundle(candidate: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _variant(candidate, tmp_path_factory.mktemp("upload") / "bundle", "digit-upload")


@pytest.fixture(scope="module")
def hard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hard-examples")


@pytest.fixture(scope="module")
def server(candidate: Path, upload_bundle: Path, hard_dir: Path) -> Iterator[tuple[ServerProcess, int]]:
    http_port, grpc_port = free_port(), free_port()
    spec = {
        "digits-logged": {"bundles": [str(candidate)], "hard_examples": str(hard_dir)},
        "digits": {"bundles": [str(candidate)]},
        "digits-tta": {"bundles": [str(candidate)], "tta": "17"},
        "digits-ensemble": {"bundles": [str(candidate), str(candidate)]},
        "digits-upload": {"bundles": [str(upload_bundle)]},
    }
    argv = [sys.executable, str(Path(__file__).parent / "serve_many.py"), str(http_port), str(grpc_port)]
    with running_server([*argv, json.dumps(spec)], http_port, timeout_s=120) as proc:
        yield proc, grpc_port


@pytest.fixture(scope="module")
def val_test(trained: Path) -> tuple[np.ndarray, np.ndarray]:
    data = load_dataset(trained / "ds").split("val_test", "evaluate")
    return data.images[:12], data.labels[:12]


def _post(url: str, body: object) -> tuple[int, dict[str, object]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _v1(server: ServerProcess, model: str, instances: list[object]) -> tuple[int, dict[str, object]]:
    return _post(f"{server.base_url}/v1/models/{model}:predict", {"instances": instances})


def _probs(prediction: dict[str, object]) -> list[float]:
    probs = prediction["probabilities"]
    assert isinstance(probs, dict)
    return [float(v) for v in probs.values()]


def test_v1_served_decisions_equal_validated_ones(
    server: tuple[ServerProcess, int], candidate: Path, val_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, _ = val_test
    expected = B.BundleModel(B.read_bundle(candidate)).predict_images(images)
    status, body = _v1(server[0], "digits", [{"b64": _b64(_png(img))} for img in images])
    assert status == 200
    predictions = body["predictions"]
    assert isinstance(predictions, list) and len(predictions) == len(images)
    for i, p in enumerate(predictions):
        assert p["label"] == int(expected.decisions.labels[i])
        np.testing.assert_allclose(_probs(p), expected.calibrated_probs[i], atol=2e-6)
        assert abs(sum(_probs(p)) - 1) < 1e-4
        assert p["bundle_version"] == B.read_bundle(candidate).version
        assert set(p) >= {"class_name", "confidence", "decision", "policy"}
    status, pixels = _v1(server[0], "digits", [img[..., 0].tolist() for img in images[:3]])
    assert status == 200 and [p["label"] for p in pixels["predictions"]] == [p["label"] for p in predictions[:3]]  # type: ignore[index]


def test_v2_rest_with_independent_client(
    server: tuple[ServerProcess, int], val_test: tuple[np.ndarray, np.ndarray]
) -> None:
    images, labels = val_test
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server[0].port}")
    assert client.is_model_ready("digits")
    encoded = tritonhttp.InferInput("image", [len(images)], "BYTES")
    # base64 JSON strings here; raw PNG bytes via the binary tensor extension are covered in test_oip.py
    encoded.set_data_from_numpy(np.array([_b64(_png(img)) for img in images], dtype=np.object_), binary_data=False)
    by_bytes = client.infer("digits", [encoded], headers=JSON)
    pixels = tritonhttp.InferInput("pixels", [len(images), 8, 8], "FP32")
    pixels.set_data_from_numpy(images[..., 0].astype(np.float32), binary_data=True)
    by_pixels = client.infer("digits", [pixels])
    np.testing.assert_array_equal(by_bytes.as_numpy("label"), by_pixels.as_numpy("label"))
    probs = by_bytes.as_numpy("probabilities")
    assert probs.shape == (len(images), 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    decided = by_bytes.as_numpy("label") != -1
    assert (by_bytes.as_numpy("label")[decided] == labels[decided]).mean() > 0.7
    record = json.loads(by_bytes.as_numpy("result")[0])
    assert record["decision"]["abstain"] == bool(by_bytes.as_numpy("abstain")[0])


GRPC_CLIENT = """
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
port, pngs = sys.argv[1], [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")
encoded = grpcclient.InferInput("image", [len(pngs)], "BYTES")
encoded.set_data_from_numpy(np.array(pngs, dtype=np.object_))
answer = client.infer("digits", [encoded])
print(json.dumps(answer.as_numpy("label").tolist()))
"""


def test_v2_grpc_with_independent_client(
    server: tuple[ServerProcess, int], val_test: tuple[np.ndarray, np.ndarray]
) -> None:
    # tritonclient.grpc and kserve register the same protobuf names: the gRPC client runs in its own process.
    images, _ = val_test
    pngs = [_png(img) for img in images[:4]]
    done = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, str(server[1])],
        input=json.dumps([p.hex() for p in pngs]),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rest = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server[0].port}")
    rest_input = tritonhttp.InferInput("image", [4], "BYTES")
    rest_input.set_data_from_numpy(np.array([_b64(p) for p in pngs], dtype=np.object_), binary_data=False)
    assert json.loads(done.stdout) == rest.infer("digits", [rest_input], headers=JSON).as_numpy("label").tolist()


def test_tta_and_ensemble(server: tuple[ServerProcess, int], val_test: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = val_test
    instances = [{"b64": _b64(_png(img))} for img in images]
    _, plain = _v1(server[0], "digits", instances)
    _, tta = _v1(server[0], "digits-tta", instances)
    _, ensemble = _v1(server[0], "digits-ensemble", instances)
    plain_p = np.array([_probs(p) for p in plain["predictions"]])  # type: ignore[union-attr]
    tta_p = np.array([_probs(p) for p in tta["predictions"]])  # type: ignore[union-attr]
    ens_p = np.array([_probs(p) for p in ensemble["predictions"]])  # type: ignore[union-attr]
    np.testing.assert_allclose(tta_p.sum(axis=1), 1.0, atol=1e-4)
    assert np.abs(tta_p - plain_p).max() > 1e-4  # the 17 variants really changed the average
    assert (tta_p.argmax(1) == labels).mean() >= (plain_p.argmax(1) == labels).mean() - 0.2
    np.testing.assert_allclose(ens_p, plain_p, atol=2e-6)  # two identical members average to one
    assert "+" in ensemble["predictions"][0]["bundle_version"]  # type: ignore[index]


def test_digit_upload_path_normalises_photos(server: tuple[ServerProcess, int]) -> None:
    canvas = Image.new("RGB", (120, 160), (235, 230, 220))  # a photo: dark ink on light paper, off-centre
    from PIL import ImageDraw

    ImageDraw.Draw(canvas).line([(70, 30), (70, 130)], fill=(20, 20, 30), width=9)
    status, body = _v1(server[0], "digits-upload", [{"b64": _b64(_png(np.asarray(canvas), "JPEG"))}])
    assert status == 200
    prediction = body["predictions"][0]  # type: ignore[index]
    assert abs(sum(_probs(prediction)) - 1) < 1e-4


def test_ensemble_with_different_preprocessing_is_refused(candidate: Path, upload_bundle: Path) -> None:
    predictor = VisionPredictor("mixed", [str(candidate), str(upload_bundle)])
    with pytest.raises(EnsembleError, match="an ensemble needs one preprocessing"):
        predictor.load()
    assert not predictor.ready


def test_tampered_bundle_never_becomes_ready(candidate: Path, tmp_path: Path) -> None:
    root = tmp_path / "b"
    shutil.copytree(candidate, root)
    (root / "weights" / "member-0.safetensors").write_bytes(b"not weights")
    predictor = VisionPredictor("tampered", [str(root)])
    with pytest.raises(B.ChecksumMismatch):
        predictor.load()
    assert not predictor.ready


def _truncated_png() -> str:
    data = _png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    return _b64(data[: len(data) // 2])  # header intact, pixel data cut off


BAD_V1: list[tuple[str, list[object], int, str]] = [
    ("not an image", [{"b64": _b64(b"hello, not an image")}], 400, "not_an_image"),
    ("truncated png", [{"b64": _truncated_png()}], 400, "truncated_image"),
    ("huge image", [{"b64": _b64(_png(np.zeros((600, 600), np.uint8)))}], 400, "image_too_large"),
    ("bad base64", [{"b64": "@@@"}], 400, "bad_base64"),
    ("wrong shape", [[[[1.0, 2.0]]]], 400, "wrong_shape"),
    ("out of range", [[[300.0, 0.0], [0.0, 0.0]]], 400, "out_of_range"),
    ("empty batch", [], 400, "empty_batch"),
    ("not pixels", [[["a", "b"]]], 400, "bad_pixels"),
]


@pytest.mark.parametrize(("case", "instances", "status", "code"), BAD_V1, ids=[c[0] for c in BAD_V1])
def test_bad_v1_inputs_get_named_4xx_and_server_keeps_serving(
    server: tuple[ServerProcess, int], case: str, instances: list[object], status: int, code: str
) -> None:
    got, body = _v1(server[0], "digits", instances)
    assert got == status, body
    assert str(body.get("error", "")).startswith(code), body
    ok, _ = _v1(server[0], "digits", [np.zeros((8, 8)).tolist()])
    assert ok == 200


def test_bad_v2_inputs(server: tuple[ServerProcess, int]) -> None:
    url = f"{server[0].base_url}/v2/models/digits/infer"
    wrong_dtype = {"inputs": [{"name": "x", "datatype": "INT32", "shape": [1, 2, 2], "data": [1, 2, 3, 4]}]}
    wrong_shape = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [4], "data": [1, 2, 3, 4]}]}
    for body, code in [(wrong_dtype, "wrong_dtype"), (wrong_shape, "wrong_shape")]:
        status, answer = _post(url, body)
        assert status == 400 and str(answer["error"]).startswith(code), answer
    client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{server[0].port}")
    nan = tritonhttp.InferInput("pixels", [1, 8, 8], "FP32")
    nan.set_data_from_numpy(np.full((1, 8, 8), np.nan, np.float32), binary_data=True)
    with pytest.raises(Exception, match="non_finite"):
        client.infer("digits", [nan])
    status, _ = _post(f"{server[0].base_url}/v2/models/no-such-model/infer", wrong_shape)
    assert status == 404
    status, _ = _v1(server[0], "digits", [np.zeros((8, 8)).tolist()])
    assert status == 200


def test_hard_examples_are_logged_with_their_images(server: tuple[ServerProcess, int], hard_dir: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (3, 8, 8), dtype=np.uint8)
    status, _ = _v1(server[0], "digits-logged", [img.tolist() for img in noise])
    assert status == 200
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(list(hard_dir.rglob("*.json"))) < 3:
        time.sleep(0.2)
    records = [json.loads(p.read_text()) for p in hard_dir.rglob("*.json")]
    assert len(records) == 3 and len(list(hard_dir.rglob("*.png"))) == 3
    assert {r["reason"] for r in records} <= {"abstain", "low_margin"}
    assert all("/unlabelled/" in str(p) for p in hard_dir.rglob("*.png"))
