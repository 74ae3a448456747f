"""The compiled CPU runtime (issue 17): ONNX export in the bundle, ONNX Runtime through BundleModel, refusal of a
missing / tampered compiled file, and bundle_validation's compiled parity (plus its decision-parity rule, shared
with the torch parity, issue 16)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from images import png_bytes
from torch import nn

from visionpipe.data.datasets import load_dataset
from visionpipe.harness import free_port, running_server
from visionpipe.phases import bundle_validation as V
from visionpipe.serving import bundle as B
from visionpipe.serving import compiled as C
from visionpipe.serving import signing
from visionpipe.serving.models import build_model
from visionpipe.serving.policies import APS_U_GRID, ConformalConfig, Decisions, ThresholdPolicy
from visionpipe.serving.tta import tta_batch
from visionpipe.serving.views import predict_rows
from visionpipe.specs import ArchSpec
from visionpipe.specs.preprocess import ViewsSpec


@pytest.fixture(scope="module")
def onnx_candidate(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, V.ValidationResult]:
    """The digits candidate validated with compiled_runtime=onnx (read-only for the tests)."""
    out = tmp_path_factory.mktemp("onnx-candidate") / "bundle"
    result = V.run(
        trained / "ds",
        trained / "model",
        trained / "logits",
        trained / "cal",
        out,
        threshold_dir=trained / "thr",
        gates=V.Gates(min_accuracy=0.5),
        name="digits-onnx",
        compiled_runtime="onnx",
    )
    return out, result


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(src, dest)
    return dest


def _relist_and_resign(root: Path) -> None:
    """Recompute every listed file's sha256 and re-sign bundle.json with the (trusted) test key, as an attacker
    holding the key, or a buggy exporter, would: the check under test is then reached."""
    manifest = json.loads((root / B.BUNDLE_FILE).read_text())
    files = manifest["files"]
    for rel in list(files):
        if (root / rel).is_file():
            files[rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    _write_manifest(root, manifest)


def _write_manifest(root: Path, manifest: dict[str, object]) -> None:
    (root / B.BUNDLE_FILE).write_text(json.dumps(manifest))
    (root / B.SIGNATURE_FILE).write_bytes(signing.sign_manifest(manifest, signing.default_signing_key()).to_bytes())


# ------------------------------------------------------------------------------------------ the honest bundle


def test_onnx_candidate_ships_a_signed_compiled_file_and_passes_parity(
    onnx_candidate: tuple[Path, V.ValidationResult],
) -> None:
    root, result = onnx_candidate
    checks = {c.name: c for c in result.checks}
    for name in ("compiled_export", "compiled_parity_val_calib", "compiled_parity_val_test", "parity_val_test"):
        assert checks[name].ok, checks[name].detail
    assert "prediction sets identical" in checks["compiled_parity_val_test"].detail
    max_dp = float(checks["compiled_parity_val_test"].detail.rsplit("max |Δp| ", 1)[1])
    assert max_dp < 1e-5  # reported in the validation report, and small
    assert "compiled_parity_val_test" in result.report_markdown
    bundle = B.read_bundle(root)
    files = bundle.manifest["files"]
    assert isinstance(files, dict) and V.COMPILED_MEMBER in files
    assert files[V.COMPILED_MEMBER] == hashlib.sha256((root / V.COMPILED_MEMBER).read_bytes()).hexdigest()
    entry = bundle.manifest["members"][0]["compiled"]  # type: ignore[index]
    assert entry["format"] == "onnx" and entry["file"] == V.COMPILED_MEMBER and entry["opset"] >= 17
    assert bundle.has_compiled and bundle.members[0].compiled is not None


def test_onnx_runtime_gives_torch_decisions_through_bundle_model(
    onnx_candidate: tuple[Path, V.ValidationResult], trained: Path
) -> None:
    """What the predictor calls (BundleModel.predict_images / log_probs) answers the same with runtime onnx."""
    bundle = B.read_bundle(onnx_candidate[0])
    torch_rt, onnx_rt = B.BundleModel(bundle), B.BundleModel(bundle, runtime="onnx")
    assert onnx_rt.runtime == "onnx" and len(onnx_rt.compiled) == 1
    images = load_dataset(trained / "ds").split("val_test", "evaluate").images
    a, b = torch_rt.predict_images(images), onnx_rt.predict_images(images)
    np.testing.assert_array_equal(a.decisions.labels, b.decisions.labels)
    np.testing.assert_array_equal(a.decisions.set_mask, b.decisions.set_mask)
    assert float(np.max(np.abs(a.calibrated_probs - b.calibrated_probs))) < 1e-5
    diff = V.compare_decisions(b, a, bundle.policy)
    assert not diff.problems("onnx", "torch")


def test_dynamic_batch_tta_and_views_are_one_batched_call(onnx_candidate: tuple[Path, V.ValidationResult]) -> None:
    bundle = B.read_bundle(onnx_candidate[0])
    torch_rt, onnx_rt = B.BundleModel(bundle), B.BundleModel(bundle, runtime="onnx")
    spec = bundle.preprocess
    gen = torch.Generator().manual_seed(3)
    for rows in (1, 5):
        x = torch.randn(rows, spec.channels, spec.size, spec.size, generator=gen)
        np.testing.assert_allclose(onnx_rt.log_probs(x), torch_rt.log_probs(x), atol=1e-4)
    x = torch.randn(3, spec.channels, spec.size, spec.size, generator=gen)
    variants = tta_batch(x, "5", fill=-1.0)  # (3 * 5, C, S, S) variant-major, one call
    got = onnx_rt.log_probs(variants)
    assert got.shape == (15, len(bundle.classes))
    np.testing.assert_allclose(got, torch_rt.log_probs(variants), atol=1e-4)
    viewed = replace(spec, views=ViewsSpec(grid=2, overlap=0.25, aggregate="max"))
    images = np.random.default_rng(0).integers(0, 256, size=(4, 40, 40, 1), dtype=np.uint8)
    calls: list[int] = []

    def counted(x: torch.Tensor) -> np.ndarray:
        calls.append(len(x))
        return onnx_rt.log_probs(x)

    np.testing.assert_allclose(
        predict_rows(counted, images, viewed), predict_rows(torch_rt.log_probs, images, viewed), atol=1e-4
    )
    assert calls == [4 * 5]  # 4 images x (global view + 2x2 tiles) in one ONNX Runtime call


@pytest.mark.long  # one EfficientNet-Lite0 export costs ~17 s of CPU (35-70 s wall on the shared 2 cores)
def test_efficientnet_lite0_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = ArchSpec.from_dict({"name": "efficientnet-lite0", "num_classes": 2, "in_channels": 3, "image_size": 32})
    model = build_model(spec).eval()
    exported = C.export_onnx(model, 3, 32, 2, tmp_path / "lite0.onnx")
    assert exported.round_trip_max_diff <= C.EXPORT_TOLERANCE
    member = C.load_onnx((tmp_path / "lite0.onnx").read_bytes(), 3, 32, 2)
    for rows in (1, 5):
        x = torch.randn(rows, 3, 32, 32)
        with torch.no_grad():
            want = model(x).numpy()
        np.testing.assert_allclose(member.logits(x.numpy()), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(C.CompiledError, match=r"input 'input' has shape \[None, 3, 32, 32\]; the bundle needs"):
        C.load_onnx((tmp_path / "lite0.onnx").read_bytes(), 3, 64, 2)


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 0:
            return x.flatten(1)[:, :2]
        return -x.flatten(1)[:, :2]


def test_an_architecture_that_does_not_export_is_reported_not_crashed(tmp_path: Path) -> None:
    with pytest.raises(C.CompiledError, match=r"does not export to ONNX .*compiled_runtime=none") as err:
        C.export_onnx(_DataDependent(), 1, 4, 2, tmp_path / "bad.onnx")
    assert "_DataDependent" in str(err.value)
    assert not (tmp_path / "bad.onnx").exists()


def test_unknown_compiled_runtime_is_refused_before_anything_is_written(trained: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"compiled_runtime='tensorrt' is not one of \('none', 'onnx'\)"):
        V.run(
            trained / "ds",
            trained / "model",
            trained / "logits",
            trained / "cal",
            tmp_path / "b",
            compiled_runtime="tensorrt",
        )
    assert not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------- refusals


def test_tampered_compiled_file_is_refused_on_load(
    onnx_candidate: tuple[Path, V.ValidationResult], tmp_path: Path
) -> None:
    root = _copy(onnx_candidate[0], tmp_path)
    path = root / V.COMPILED_MEMBER
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(B.ChecksumMismatch, match=r"compiled/member-0.onnx: sha256") as err:
        B.read_bundle(root)
    assert err.value.reason == "checksum_mismatch"


def test_missing_compiled_file_is_refused_on_load(
    onnx_candidate: tuple[Path, V.ValidationResult], tmp_path: Path
) -> None:
    root = _copy(onnx_candidate[0], tmp_path)
    (root / V.COMPILED_MEMBER).unlink()
    with pytest.raises(B.ChecksumMismatch, match=r"member-0.onnx: listed in bundle.json but missing"):
        B.read_bundle(root)
    manifest = json.loads((root / B.BUNDLE_FILE).read_text())
    del manifest["files"][V.COMPILED_MEMBER]  # unlisted too, the member still claims it (re-signed)
    _write_manifest(root, manifest)
    with pytest.raises(
        B.ChecksumMismatch, match=r"members\[0\].compiled.file='compiled/member-0.onnx' has no checksum"
    ):
        B.read_bundle(root)


def test_malformed_compiled_entry_or_file_is_refused_by_name(
    onnx_candidate: tuple[Path, V.ValidationResult], tmp_path: Path
) -> None:
    root = _copy(onnx_candidate[0], tmp_path)
    manifest = json.loads((root / B.BUNDLE_FILE).read_text())
    manifest["members"][0]["compiled"]["format"] = "tensorrt"
    _write_manifest(root, manifest)
    with pytest.raises(B.CompiledModelInvalid, match=r"compiled.format='tensorrt' is not one of \('onnx',\)"):
        B.read_bundle(root)
    manifest["members"][0]["compiled"]["format"] = "onnx"
    _write_manifest(root, manifest)
    (root / V.COMPILED_MEMBER).write_bytes(b"\x08\x07 this is not a protobuf graph" * 10)
    _relist_and_resign(root)
    bundle = B.read_bundle(root)
    B.BundleModel(bundle)  # the torch runtime does not open the compiled file
    with pytest.raises(B.CompiledModelInvalid, match=r"member-0.onnx: not an ONNX model") as err:
        B.BundleModel(bundle, runtime="onnx")
    assert err.value.reason == "compiled_model"


def test_a_bundle_without_compiled_file_is_refused_for_the_onnx_runtime(candidate: Path) -> None:
    bundle = B.read_bundle(candidate)
    assert not bundle.has_compiled
    with pytest.raises(B.NoCompiledModel, match=r"ship no compiled model; serve it with --runtime torch") as err:
        B.BundleModel(bundle, runtime="onnx")
    assert err.value.reason == "no_compiled_model"
    with pytest.raises(ValueError, match=r"runtime='tvm' is not one of \('torch', 'onnx'\)"):
        B.BundleModel(bundle, runtime="tvm")


def test_compiled_model_with_perturbed_weights_is_refused_by_bundle_validation(
    onnx_candidate: tuple[Path, V.ValidationResult], trained: Path, tmp_path: Path
) -> None:
    """A compiled file whose weights differ from the torch model's (listed and re-signed with the test key, so every
    file check passes) is refused by the compiled parity check with the split, the count, indices and max |Δp|."""
    import onnx
    from onnx import numpy_helper

    root = _copy(onnx_candidate[0], tmp_path)
    proto = onnx.load(str(root / V.COMPILED_MEMBER))
    head = next(t for t in proto.graph.initializer if t.name.startswith("head.weight"))
    weights = numpy_helper.to_array(head)
    perturbed = weights + np.random.default_rng(0).normal(0.0, 3.0 * float(weights.std()), weights.shape)
    head.CopyFrom(numpy_helper.from_array(perturbed.astype(np.float32), head.name))
    onnx.save(proto, str(root / V.COMPILED_MEMBER))
    _relist_and_resign(root)
    runtime = B.BundleModel(B.read_bundle(root))  # every file verifies: the tampering is only visible in answers
    checks = V.check_compiled_parity(runtime, load_dataset(trained / "ds"))
    assert [c.name for c in checks] == ["compiled_parity_val_calib", "compiled_parity_val_test"]
    for check in checks:
        assert not check.ok
        split = check.name.removeprefix("compiled_parity_")
        assert check.detail.startswith(f"{split}: labels of compiled (onnx) differ from torch on ")
        assert "(first: [" in check.detail and "max |Δp| " in check.detail


# ------------------------------------------------------------------------------------------ decision parity


def _prediction(probs: np.ndarray, policy: ThresholdPolicy) -> B.Prediction:
    from visionpipe.serving.policies import apply_policy

    return B.Prediction(probs, probs, apply_policy(policy, probs, probs))


def _aps_policy() -> ThresholdPolicy:
    aps = ConformalConfig(method="aps", qhat=0.9, alpha=0.1)
    return ThresholdPolicy(threshold=0.999, space="calibrated", task="multiclass", conformal=aps)


def _at_grid_midpoint(top: float, eps: float) -> np.ndarray:
    """A 3-class row whose top log-probability sits `eps` nats beside a 1/64-nat grid midpoint."""
    k = math.floor(APS_U_GRID * math.log(top))
    p0 = math.exp((k + 0.5) / APS_U_GRID + eps)
    rest = 1.0 - p0
    return np.array([[p0, rest * 0.6, rest * 0.4]])


def test_a_set_that_differs_only_through_an_aps_u_flip_is_tolerated_and_counted() -> None:
    policy = _aps_policy()
    a, b = _prediction(_at_grid_midpoint(0.7, -1e-9), policy), _prediction(_at_grid_midpoint(0.7, 1e-9), policy)
    assert a.decisions.labels[0] == b.decisions.labels[0] == -1  # abstains: the APS set is attached
    # force the two sets apart (real u flips change the set only where u * p_y crosses qhat)
    mask = a.decisions.set_mask.copy()
    mask[0, 2] = not mask[0, 2]
    b = B.Prediction(b.raw_probs, b.calibrated_probs, Decisions(b.decisions.labels, b.decisions.policy_names, mask))
    diff = V.compare_decisions(a, b, policy)
    assert diff.u_flips.tolist() == [0] and diff.sets.tolist() == []
    assert diff.problems("onnx", "torch") == []
    assert "1 APS u flip(s) tolerated" in diff.summary()
    same_u = B.Prediction(a.raw_probs, a.calibrated_probs, b.decisions)  # same probabilities, so the same u
    refused = V.compare_decisions(a, same_u, policy).problems("onnx", "torch")
    assert refused and refused[0].startswith("prediction sets (not an APS u flip) of onnx differ from torch on 1 of 1")


def test_more_u_flips_than_tolerated_or_a_changed_label_is_refused() -> None:
    policy = _aps_policy()
    rows = 3
    pa = np.concatenate([_at_grid_midpoint(0.6 + 0.05 * i, -1e-9) for i in range(rows)])
    pb = np.concatenate([_at_grid_midpoint(0.6 + 0.05 * i, 1e-9) for i in range(rows)])
    a, b = _prediction(pa, policy), _prediction(pb, policy)
    flipped = ~a.decisions.set_mask
    b = B.Prediction(pb, pb, Decisions(b.decisions.labels, b.decisions.policy_names, flipped))
    diff = V.compare_decisions(a, b, policy)
    assert len(diff.u_flips) == rows and diff.allowed_u_flips == 1
    assert any(
        "through an APS u flip on 3 of 3 images, more than the 1 tolerated" in p for p in diff.problems("x", "y")
    )
    labels = a.decisions.labels.copy()
    labels[1] = 0
    relabelled = B.Prediction(pa, pa, Decisions(labels, a.decisions.policy_names, a.decisions.set_mask))
    problems = V.compare_decisions(a, relabelled, policy).problems("served", "training-side logits")
    assert problems[0] == "labels of served differ from training-side logits on 1 of 3 images (first: [1])"
    assert problems[1].startswith("abstain decisions of served differ")


def test_the_server_with_runtime_onnx_answers_the_torch_decisions(
    onnx_candidate: tuple[Path, V.ValidationResult], trained: Path
) -> None:
    """`--runtime onnx` over the real ModelServer (tritonclient, v2 REST, PNG bytes): the decisions and calibrated
    probabilities of the torch model computed in-process on the same images."""
    tritonhttp = pytest.importorskip("tritonclient.http")
    root = onnx_candidate[0]
    images = load_dataset(trained / "ds").split("val_test", "evaluate").images[:6]
    want = B.BundleModel(B.read_bundle(root)).predict_images(images)
    port = free_port()
    argv = [sys.executable, "-m", "visionpipe.serving.server", "--bundle", str(root), "--runtime", "onnx"]
    with running_server([*argv, "--model_name", "digits", "--http_port", str(port)], port, timeout_s=120):
        client = tritonhttp.InferenceServerClient(url=f"127.0.0.1:{port}")
        tensor = tritonhttp.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array([png_bytes(img) for img in images], dtype=np.object_), binary_data=True)
        wanted = [tritonhttp.InferRequestedOutput(name) for name in ("label", "probabilities")]
        answer = client.infer("digits", [tensor], outputs=wanted)
    np.testing.assert_array_equal(answer.as_numpy("label"), want.decisions.labels)
    assert float(np.max(np.abs(answer.as_numpy("probabilities") - want.calibrated_probs))) < 1e-5
