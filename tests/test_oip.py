"""Open Inference Protocol conformance of the served predictor, on KServe's real ModelServer on 127.0.0.1,
checked with the independent tritonclient (http in-process, grpc in a subprocess) and raw HTTP:
model metadata lists the real tensors, requested outputs are honoured, every error body is
``{"error": ...}`` and the binary tensor extension carries raw PNG bytes."""

from __future__ import annotations

import base64
import http.client
import json
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from images import png_bytes

from visionpipe.data.datasets import load_dataset
from visionpipe.harness import ServerProcess, free_port, running_server
from visionpipe.serving import bundle as B

tritonhttp = pytest.importorskip("tritonclient.http")
tritonutils = pytest.importorskip("tritonclient.utils")

MODEL = "digits"
OUTPUTS = ("label", "probabilities", "confidence", "abstain", "result")


@pytest.fixture(scope="module")
def served(candidate: Path) -> Iterator[tuple[ServerProcess, int]]:
    http_port, grpc_port = free_port(), free_port()
    argv = [sys.executable, str(Path(__file__).parent / "serve_many.py"), str(http_port), str(grpc_port)]
    with running_server([*argv, json.dumps({MODEL: {"bundles": [str(candidate)]}})], http_port, timeout_s=120) as proc:
        yield proc, grpc_port


@pytest.fixture(scope="module")
def pngs(trained: Path) -> list[bytes]:
    return [png_bytes(img) for img in load_dataset(trained / "ds").split("val_test", "evaluate").images[:6]]


@pytest.fixture(scope="module")
def spec(candidate: Path) -> tuple[int, int, int]:
    """(size, channels, number of classes) from the bundle itself."""
    bundle = B.read_bundle(candidate)
    return bundle.preprocess.size, bundle.preprocess.channels, len(bundle.classes)


def _client(served: tuple[ServerProcess, int]) -> object:
    return tritonhttp.InferenceServerClient(url=f"127.0.0.1:{served[0].port}")


def _b64_input(pngs: list[bytes]) -> object:
    tensor = tritonhttp.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array([base64.b64encode(p).decode() for p in pngs], dtype=np.object_), False)
    return tensor


def _binary_input(pngs: list[bytes]) -> object:
    tensor = tritonhttp.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_), binary_data=True)
    return tensor


def _request(
    served: tuple[ServerProcess, int], method: str, path: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection("127.0.0.1", served[0].port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


def _expected_metadata(spec: tuple[int, int, int]) -> tuple[list[dict[str, object]], list[dict[str, object]]]:
    size, channels, n_classes = spec
    inputs: list[dict[str, object]] = [
        {"name": "image", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, size, size, channels]},
        {"name": "pixels_uint8", "datatype": "UINT8", "shape": [-1, size, size, channels]},
    ]
    dtypes = {"label": "INT64", "probabilities": "FP32", "confidence": "FP32", "abstain": "BOOL", "result": "BYTES"}
    outputs: list[dict[str, object]] = [
        {"name": n, "datatype": dtypes[n], "shape": [-1, n_classes] if n == "probabilities" else [-1]} for n in OUTPUTS
    ]
    return inputs, outputs


# ----------------------------------------------------------------------------------------------- metadata
def test_rest_metadata_lists_the_real_tensors(
    served: tuple[ServerProcess, int], spec: tuple[int, int, int], pngs: list[bytes]
) -> None:
    client = _client(served)
    metadata = client.get_model_metadata(MODEL)
    inputs, outputs = _expected_metadata(spec)
    assert metadata["name"] == MODEL
    assert metadata["inputs"] == inputs
    assert metadata["outputs"] == outputs
    # The metadata describes what an answer really carries: same names, order, datatypes, shapes (-1 = batch).
    answer = client.infer(MODEL, [_b64_input(pngs)]).get_response()
    carried = [(o["name"], o["datatype"], o["shape"]) for o in answer["outputs"]]
    declared = [(o["name"], o["datatype"], [len(pngs) if d == -1 else d for d in o["shape"]]) for o in outputs]
    assert carried == declared
    # Each declared input form is accepted under its declared name, datatype and shape.
    size, channels, _ = spec
    pixels = np.zeros((2, size, size, channels), np.float32)
    for name, datatype, array in [("pixels", "FP32", pixels), ("pixels_uint8", "UINT8", pixels.astype(np.uint8))]:
        tensor = tritonhttp.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=True)
        assert client.infer(MODEL, [tensor]).as_numpy("label").shape == (2,)
    status, body = _request(served, "GET", "/v2/models/no-such-model", None, {})
    assert status == 404 and "no-such-model" in str(body["error"])


GRPC_CLIENT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

port, model = sys.argv[1], sys.argv[2]
pngs = [bytes.fromhex(h) for h in json.loads(sys.stdin.read())]
client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{port}")

def image():
    tensor = grpcclient.InferInput("image", [len(pngs)], "BYTES")
    tensor.set_data_from_numpy(np.array(pngs, dtype=np.object_))
    return tensor

def error(call):
    try:
        call()
    except InferenceServerException as exc:
        return [str(exc.status()), exc.message()]
    return None

out = {"metadata": client.get_model_metadata(model, as_json=True)}
wanted = [grpcclient.InferRequestedOutput("confidence"), grpcclient.InferRequestedOutput("label")]
answer = client.infer(model, [image()], outputs=wanted)
out["names"] = [o["name"] for o in answer.get_response(as_json=True)["outputs"]]
out["label"] = answer.as_numpy("label").tolist()
out["confidence"] = answer.as_numpy("confidence").tolist()
out["unknown"] = error(lambda: client.infer(model, [image()], outputs=[grpcclient.InferRequestedOutput("nope")]))
garbage = image()
garbage._raw_content = b"\xff\x00\x00\x00abc"  # a length prefix that lies
out["garbage"] = error(lambda: client.infer(model, [garbage]))
out["after"] = client.infer(model, [image()]).as_numpy("label").tolist()
print(json.dumps(out))
"""


def test_grpc_metadata_requested_outputs_and_errors(
    served: tuple[ServerProcess, int], spec: tuple[int, int, int], pngs: list[bytes]
) -> None:
    # tritonclient.grpc and kserve register the same protobuf names: the gRPC client runs in its own process.
    done = subprocess.run(
        [sys.executable, "-c", GRPC_CLIENT, str(served[1]), MODEL],
        input=json.dumps([p.hex() for p in pngs]),
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
    )
    got = json.loads(done.stdout)
    inputs, outputs = _expected_metadata(spec)

    def tensors(items: list[dict[str, object]]) -> list[tuple[object, object, list[int]]]:
        return [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in items]  # int64 as JSON strings

    assert got["metadata"]["name"] == MODEL
    assert tensors(got["metadata"]["inputs"]) == tensors(inputs)
    assert tensors(got["metadata"]["outputs"]) == tensors(outputs)
    assert got["names"] == ["confidence", "label"]
    rest = _client(served).infer(MODEL, [_b64_input(pngs)])
    assert got["label"] == rest.as_numpy("label").tolist()
    np.testing.assert_allclose(got["confidence"], rest.as_numpy("confidence"), atol=1e-7)
    status, message = got["unknown"]
    assert status == "StatusCode.INVALID_ARGUMENT"
    assert message.startswith("unknown_output") and "'nope'" in message and all(n in message for n in OUTPUTS)
    status, message = got["garbage"]
    assert status == "StatusCode.INVALID_ARGUMENT" and message.startswith("bad_binary"), message
    assert got["after"] == got["label"]


# ------------------------------------------------------------------------------------------ requested outputs
def test_rest_requested_outputs_are_honoured_in_order(served: tuple[ServerProcess, int], pngs: list[bytes]) -> None:
    client = _client(served)
    full = client.infer(MODEL, [_b64_input(pngs)])
    wanted = [
        tritonhttp.InferRequestedOutput("result", binary_data=True),
        tritonhttp.InferRequestedOutput("confidence", binary_data=False),
        tritonhttp.InferRequestedOutput("label", binary_data=True),
    ]
    answer = client.infer(MODEL, [_b64_input(pngs)], outputs=wanted)
    outputs = answer.get_response()["outputs"]
    assert [o["name"] for o in outputs] == ["result", "confidence", "label"]
    assert "binary_data_size" in outputs[0]["parameters"] and "data" not in outputs[0]  # binary data extension
    assert "data" in outputs[1] and "binary_data_size" not in (outputs[1].get("parameters") or {})
    assert answer.as_numpy("probabilities") is None
    np.testing.assert_array_equal(answer.as_numpy("label"), full.as_numpy("label"))
    np.testing.assert_array_equal(answer.as_numpy("confidence"), full.as_numpy("confidence"))
    records = [json.loads(r) for r in answer.as_numpy("result")]
    assert [r["label"] for r in records] == full.as_numpy("label").tolist()
    # With no outputs named, tritonclient sets the request-wide binary_data_output parameter: all binary.
    assert all("binary_data_size" in o["parameters"] and "data" not in o for o in full.get_response()["outputs"])
    # Plain JSON: only the requested tensor comes back.
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(pngs[0]).decode()]}],
        "outputs": [{"name": "abstain"}],
    }
    status, reply = _request(served, "POST", f"/v2/models/{MODEL}/infer", json.dumps(body).encode(), _JSON)
    assert status == 200 and [o["name"] for o in reply["outputs"]] == ["abstain"]
    assert isinstance(reply["outputs"][0]["data"][0], bool)  # no binary_data asked: JSON data


_JSON = {"Content-Type": "application/json"}


def test_unknown_output_is_a_named_400(served: tuple[ServerProcess, int], pngs: list[bytes]) -> None:
    body = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [base64.b64encode(pngs[0]).decode()]}],
        "outputs": [{"name": "label"}, {"name": "logits"}],
    }
    status, reply = _request(served, "POST", f"/v2/models/{MODEL}/infer", json.dumps(body).encode(), _JSON)
    assert status == 400, reply
    message = str(reply["error"])
    assert message.startswith("unknown_output") and "'logits'" in message and all(n in message for n in OUTPUTS)
    with pytest.raises(tritonutils.InferenceServerException, match="unknown_output"):
        _client(served).infer(MODEL, [_binary_input(pngs[:1])], outputs=[tritonhttp.InferRequestedOutput("nope")])


# --------------------------------------------------------------------------------------------- error bodies
_IMAGE = {"name": "image", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}
BAD_BODIES: list[tuple[str, str, bytes, dict[str, str], int, str]] = [
    ("malformed json", "/v2/models/digits/infer", b'{"inputs": [', _JSON, 400, "bad_json"),
    ("malformed json, no content type", "/v2/models/digits/infer", b'{"inputs": [', {}, 400, "bad_json"),
    ("not an object", "/v2/models/digits/infer", b"[1, 2]", _JSON, 400, "bad_request"),
    ("no inputs", "/v2/models/digits/infer", b'{"id": "1"}', _JSON, 400, "bad_request"),
    ("inputs not a list", "/v2/models/digits/infer", b'{"inputs": "x"}', _JSON, 400, "bad_request"),
    (
        "shape not ints",
        "/v2/models/digits/infer",
        json.dumps({"inputs": [{**_IMAGE, "shape": ["a"]}]}).encode(),
        _JSON,
        400,
        "bad_request",
    ),
    (
        "no shape, no content type",
        "/v2/models/digits/infer",
        json.dumps({"inputs": [{"name": "image", "datatype": "BYTES", "data": ["aGk="]}]}).encode(),
        {},
        400,
        "bad_request",
    ),
    ("empty body", "/v2/models/digits/infer", b"", _JSON, 400, "bad_request"),
    ("v1 malformed json", "/v1/models/digits:predict", b'{"instances": [', _JSON, 400, ""),
    ("unknown model", "/v2/models/nope/infer", json.dumps({"inputs": [_IMAGE]}).encode(), _JSON, 404, ""),
    ("unknown route", "/v2/nowhere", b"{}", _JSON, 404, ""),
]


@pytest.mark.parametrize(
    ("case", "path", "body", "headers", "status", "code"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
def test_error_bodies_are_error_json(
    served: tuple[ServerProcess, int],
    case: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    got, reply = _request(served, "POST", path, body, headers)
    assert got == status, reply
    assert set(reply) == {"error"} and isinstance(reply["error"], str) and reply["error"], reply
    assert reply["error"].startswith(code), reply


def test_wrong_method_is_error_json(served: tuple[ServerProcess, int]) -> None:
    got, reply = _request(served, "GET", f"/v2/models/{MODEL}/infer", None, {})
    assert got == 405 and set(reply) == {"error"}, reply


# ---------------------------------------------------------------------------------- binary tensor extension
def test_binary_png_bytes_answer_like_base64_json(served: tuple[ServerProcess, int], pngs: list[bytes]) -> None:
    client = _client(served)
    by_json = client.infer(MODEL, [_b64_input(pngs)])  # JSON body, no Content-Type
    by_binary = client.infer(MODEL, [_binary_input(pngs)])
    for name in ("label", "probabilities", "confidence", "abstain"):
        np.testing.assert_array_equal(by_binary.as_numpy(name), by_json.as_numpy(name))
    assert by_binary.as_numpy("result").tolist() == by_json.as_numpy("result").tolist()
    # base64 text sent as binary BYTES elements (what KServe alone accepted) still works
    text = tritonhttp.InferInput("image", [len(pngs)], "BYTES")
    text.set_data_from_numpy(np.array([base64.b64encode(p) for p in pngs], dtype=np.object_), binary_data=True)
    np.testing.assert_array_equal(client.infer(MODEL, [text]).as_numpy("label"), by_json.as_numpy("label"))


def _binary_body(header: dict[str, object], payload: bytes) -> tuple[bytes, int]:
    head = json.dumps(header).encode()
    return head + payload, len(head)


def _bytes_input(size: int, shape: list[int] | None = None) -> dict[str, object]:
    return {"name": "image", "datatype": "BYTES", "shape": shape or [1], "parameters": {"binary_data_size": size}}


def _garbage_cases(png: bytes) -> list[tuple[str, bytes, str, str]]:
    """(case, body, Inference-Header-Content-Length, expected error code)."""
    element = struct.pack("<I", len(png)) + png
    cases = []
    body, n = _binary_body({"inputs": [_bytes_input(2)]}, b"\x05\x00")
    cases.append(("short length prefix", body, str(n), "bad_binary"))
    lying = struct.pack("<I", 1000) + png[:10]
    body, n = _binary_body({"inputs": [_bytes_input(len(lying))]}, lying)
    cases.append(("lying length prefix", body, str(n), "bad_binary"))
    body, n = _binary_body({"inputs": [_bytes_input(len(element))]}, element)
    cases.append(("header length not a number", body, "twelve", "bad_binary"))
    cases.append(("header length beyond body", body, str(len(body) + 10), "bad_binary"))
    cases.append(("header length cuts the json", body, str(n - 3), "bad_json"))
    body, n = _binary_body({"inputs": [_bytes_input(len(element) + 50)]}, element)
    cases.append(("binary_data_size beyond body", body, str(n), "bad_binary"))
    body, n = _binary_body({"inputs": [_bytes_input(len(element) - 1)]}, element)
    cases.append(("bytes left over", body, str(n), "bad_binary"))
    body, n = _binary_body({"inputs": [_bytes_input(-4)]}, element)
    cases.append(("negative binary_data_size", body, str(n), "bad_binary"))
    body, n = _binary_body({"inputs": [_bytes_input(len(element), [2])]}, element)
    cases.append(("shape says two elements", body, str(n), "wrong_shape"))
    junk = struct.pack("<I", 11) + b"hello world"
    body, n = _binary_body({"inputs": [_bytes_input(len(junk))]}, junk)
    cases.append(("element is not an image", body, str(n), "not_an_image"))
    fp32 = {"name": "pixels", "datatype": "FP32", "shape": [1, 8, 8], "parameters": {"binary_data_size": 7}}
    body, n = _binary_body({"inputs": [fp32]}, b"\x00" * 7)
    cases.append(("fp32 byte count", body, str(n), "wrong_shape"))
    body, n = _binary_body({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}, element)
    cases.append(("neither data nor size", body, str(n), "bad_request"))
    return cases


def test_garbage_binary_is_a_named_400_and_the_connection_stays_usable(
    served: tuple[ServerProcess, int], pngs: list[bytes]
) -> None:
    good, good_n = _binary_body({"inputs": [_bytes_input(4 + len(pngs[0]))]}, struct.pack("<I", len(pngs[0])) + pngs[0])
    conn = http.client.HTTPConnection("127.0.0.1", served[0].port, timeout=60)
    try:
        conn.request("GET", "/v2/health/ready")
        conn.getresponse().read()
        sock = conn.sock
        for case, body, header, code in _garbage_cases(pngs[0]):
            headers = {"Inference-Header-Content-Length": header, "Content-Type": "application/octet-stream"}
            conn.request("POST", f"/v2/models/{MODEL}/infer", body=body, headers=headers)
            answer = conn.getresponse()
            reply = json.loads(answer.read())
            assert answer.status == 400, (case, reply)
            assert str(reply["error"]).startswith(code), (case, reply)
            assert conn.sock is sock, f"{case}: the server closed the keep-alive connection"
        headers = {"Inference-Header-Content-Length": str(good_n), "Content-Type": "application/octet-stream"}
        conn.request("POST", f"/v2/models/{MODEL}/infer", body=good, headers=headers)
        answer = conn.getresponse()
        reply = json.loads(answer.read())
        assert answer.status == 200 and conn.sock is sock, reply
        assert [o["name"] for o in reply["outputs"]] == list(OUTPUTS)
    finally:
        conn.close()
    # The same through tritonclient: garbage on one client, then a valid request on that client.
    client = _client(served)
    garbage = _binary_input(pngs[:1])
    garbage._raw_data = b"\xff\xff\x00\x00" + pngs[0][:20]  # a lying prefix
    garbage._parameters["binary_data_size"] = len(garbage._raw_data)
    with pytest.raises(tritonutils.InferenceServerException, match="bad_binary") as err:
        client.infer(MODEL, [garbage])
    assert err.value.status() == "400"
    assert client.infer(MODEL, [_binary_input(pngs[:2])]).as_numpy("label").shape == (2,)


def test_binary_body_sent_as_json_names_the_extension(served: tuple[ServerProcess, int], pngs: list[bytes]) -> None:
    body, n = _binary_body({"inputs": [_bytes_input(4 + len(pngs[0]))]}, struct.pack("<I", len(pngs[0])) + pngs[0])
    headers = {"Inference-Header-Content-Length": str(n), **_JSON}
    status, reply = _request(served, "POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 400 and str(reply["error"]).startswith("bad_json"), reply
    assert "Inference-Header-Content-Length" in str(reply["error"])


# ------------------------------------------------------------------------------ the REST v2 answer's one pass
def _answer(requested: list[tuple[str, bool]] | None, binary_default: bool = False) -> object:
    """An InferResponse shaped like the predictor's: every datatype it answers with, and a parameter."""
    from kserve.protocol.infer_type import InferOutput, InferResponse, RequestedOutput

    rng = np.random.default_rng(0)
    tensors: dict[str, tuple[str, np.ndarray]] = {
        "label": ("INT64", np.array([3, -1], np.int64)),
        "probabilities": ("FP32", rng.random((2, 10)).astype(np.float32)),
        "confidence": ("FP32", np.array([0.123456789, 1e-7], np.float32)),
        "abstain": ("BOOL", np.array([False, True])),
        "result": ("BYTES", np.array([json.dumps({"k": "é"}).encode(), b"{}"], dtype=np.object_)),
    }
    outputs = [InferOutput(n, list(a.shape), dt, data=a) for n, (dt, a) in tensors.items()]
    return InferResponse(
        response_id="rid",
        model_name=MODEL,
        infer_outputs=outputs,
        parameters={"bundle_version": "v1"},
        use_binary_outputs=binary_default,
        requested_outputs=None if requested is None else [RequestedOutput(n, {"binary_data": b}) for n, b in requested],
    )


@pytest.mark.parametrize(
    "requested",
    [None, [("result", False), ("label", False)], [("abstain", False)]],
    ids=["all outputs", "two, reordered", "one"],
)
def test_rest_json_answer_is_the_document_kserve_writes(requested: list[tuple[str, bool]] | None) -> None:
    from kserve.protocol.rest.v2_datamodels import InferenceResponse

    from visionpipe.serving.server_util import rest_v2_json

    fast = rest_v2_json(_answer(requested))
    assert fast is not None
    document, json_size = _answer(requested).to_rest()  # type: ignore[attr-defined]  # KServe's own path
    assert json_size is None
    kserve_doc = json.loads(InferenceResponse.model_validate(document).model_dump_json())
    assert json.loads(fast) == kserve_doc
    assert [o["name"] for o in json.loads(fast)["outputs"]] == [n for n, _ in requested or []] or requested is None


def test_rest_binary_answers_are_left_to_kserve() -> None:
    from visionpipe.serving.server_util import rest_v2_json

    assert rest_v2_json(_answer([("label", True), ("result", False)])) is None
    assert rest_v2_json(_answer(None, binary_default=True)) is None
    assert rest_v2_json({"outputs": []}) is None
