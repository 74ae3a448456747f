"""The bundle contract: assembly + validation, fail-closed reading, export to S3 / local, validate-bundle CLI."""

from __future__ import annotations

import inspect
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from visionpipe.cli import main
from visionpipe.phases.bundle_validation import Gates, ValidationFailed
from visionpipe.phases.bundle_validation import run as validate
from visionpipe.phases.export import ExportError
from visionpipe.phases.export import run as export
from visionpipe.serving import bundle as B
from visionpipe.serving import signing, storage


def _copy(src: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "copy"
    shutil.copytree(src, dest)
    return dest


def _edit_manifest(root: Path, edit: Callable[[dict[str, object]], None]) -> None:
    """Edit bundle.json on purpose and re-sign it with the (trusted) local key, so the check under test is reached."""
    manifest = json.loads((root / B.BUNDLE_FILE).read_text())
    edit(manifest)
    (root / B.BUNDLE_FILE).write_text(json.dumps(manifest))
    signature = signing.sign_manifest(manifest, signing.default_signing_key())
    (root / B.SIGNATURE_FILE).write_bytes(signature.to_bytes())


def test_valid_candidate_loads_and_reproduces_reported_metrics(candidate: Path) -> None:
    bundle = B.read_bundle(candidate)
    assert bundle.classes == tuple(str(d) for d in range(10))
    assert bundle.signature == "v1/grayscale+resize28+norm(0.5,0.5)"
    manifest = bundle.manifest
    assert set(manifest["files"]) == {  # type: ignore[arg-type]
        "weights/member-0.safetensors",
        "model_card.json",
        B.DRIFT_REFERENCE_FILE,
    }
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    assert card["name"] == "digits-test" and card["version"] == manifest["version"]
    assert "validation.md" in {p.name for p in (candidate / "reports").iterdir()}
    provenance = manifest["provenance"]
    assert isinstance(provenance, dict) and provenance["recipe_hash"] and provenance["data_fingerprint"]


def _tamper_weights(root: Path) -> None:
    path = root / "weights" / "member-0.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def _remove_field(root: Path) -> None:
    _edit_manifest(root, lambda m: m.pop("calibrator"))


def _change_signature(root: Path) -> None:
    def edit(m: dict[str, object]) -> None:
        pre = m["preprocessing"]
        assert isinstance(pre, dict)
        pre["signature"] = "v1/grayscale+resize32+norm(0.5,0.5)"

    _edit_manifest(root, edit)


def _absent_active_policy(root: Path) -> None:
    def edit(m: dict[str, object]) -> None:
        policy = m["policy"]
        assert isinstance(policy, dict)
        policy["active"] = "no-such-policy"

    _edit_manifest(root, edit)


def _unknown_schema(root: Path) -> None:
    _edit_manifest(root, lambda m: m.update(schema_version=99))


def _no_manifest(root: Path) -> None:
    (root / B.BUNDLE_FILE).unlink()


def _pickle_weights(root: Path) -> None:
    def edit(m: dict[str, object]) -> None:
        members = m["members"]
        assert isinstance(members, list)
        members[0]["weights"] = "weights/member-0.pt"

    _edit_manifest(root, edit)


@pytest.mark.parametrize(
    ("tamper", "error", "reason", "message"),
    [
        (_tamper_weights, B.ChecksumMismatch, "checksum_mismatch", "member-0.safetensors: sha256"),
        (_remove_field, B.MissingField, "missing_field", "missing field 'calibrator'"),
        (_change_signature, B.SignatureMismatch, "preprocessing_signature", "resize32"),
        (_absent_active_policy, B.InconsistentPolicy, "inconsistent_policy", "no-such-policy"),
        (_unknown_schema, B.UnknownSchema, "unknown_schema", "schema_version=99"),
        (_no_manifest, B.IncompleteBundle, "incomplete", "half uploaded"),
        (_pickle_weights, B.ChecksumMismatch, "checksum_mismatch", "member-0.pt"),
    ],
)
def test_bundle_refused_with_named_reason(
    candidate: Path,
    tmp_path: Path,
    tamper: Callable[[Path], None],
    error: type[B.BundleError],
    reason: str,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = _copy(candidate, tmp_path)
    tamper(root)
    with pytest.raises(error, match=message) as err:
        B.read_bundle(root)
    assert err.value.reason == reason
    assert main(["validate-bundle", str(root)]) == 1
    assert f"REFUSED [{reason}]" in capsys.readouterr().out


def test_validate_bundle_cli_accepts_good_bundle(candidate: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-bundle", str(candidate)]) == 0
    assert "OK digits-test" in capsys.readouterr().out


def test_val_test_overlapping_train_fails_split_contract(trained: Path, tmp_path: Path) -> None:
    ds = tmp_path / "ds"
    shutil.copytree(trained / "ds", ds)
    splits = json.loads((ds / "splits.json").read_text())
    leaked = splits["splits"]["train"]["hashes"][:3]
    splits["splits"]["val_test"]["hashes"] = sorted(splits["splits"]["val_test"]["hashes"] + leaked)
    # The split members stay as they were; only the recorded val_test content overlaps train now.
    (ds / "splits.json").write_text(json.dumps(splits))
    meta = json.loads((ds / "dataset.json").read_text())
    train_idx = splits["splits"]["train"]["indices"][:3]
    test_idx = splits["splits"]["val_test"]["indices"][:3]
    for t, v in zip(train_idx, test_idx, strict=True):
        meta["hashes"][v] = meta["hashes"][t]  # val_test images whose content equals train images
    (ds / "dataset.json").write_text(json.dumps(meta))
    out = tmp_path / "bundle"
    with pytest.raises(ValidationFailed, match=r"split_contract \(val_test shares 3 image\(s\) with train"):
        validate(ds, trained / "model", trained / "logits", trained / "cal", out, trained / "thr")
    assert not (out / B.BUNDLE_FILE).exists()  # fail closed


def test_failed_quality_gate_names_every_failed_check(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    with pytest.raises(ValidationFailed) as err:
        validate(
            trained / "ds",
            trained / "model",
            trained / "logits",
            trained / "cal",
            out,
            trained / "thr",
            gates=Gates(min_accuracy=0.9999, max_ece=0.0),
        )
    assert "gate_accuracy" in str(err.value) and "gate_ece" in str(err.value)
    assert "**FAIL**" in (out / "reports" / "validation.md").read_text()
    assert not (out / B.BUNDLE_FILE).exists()


def test_champion_gate(candidate: Path, trained: Path, tmp_path: Path) -> None:
    ok = validate(
        trained / "ds",
        trained / "model",
        trained / "logits",
        trained / "cal",
        tmp_path / "same",
        trained / "thr",
        gates=Gates(champion_uri=str(candidate)),
    )
    assert any(c.name == "champion" and c.ok for c in ok.checks)


def test_bundle_model_probabilities_sum_to_one(candidate: Path) -> None:
    runtime = B.BundleModel(B.read_bundle(candidate))
    images = np.random.default_rng(0).integers(0, 256, size=(5, 8, 8, 1), dtype=np.uint8)
    prediction = runtime.predict_images(images)
    np.testing.assert_allclose(prediction.raw_probs.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(prediction.calibrated_probs.sum(1), 1.0, atol=1e-9)


def test_export_to_s3_and_load_back(candidate: Path, s3_bucket: str, tmp_path: Path) -> None:
    result = export(candidate, f"{s3_bucket}/models")
    version = B.read_bundle(candidate).version
    assert result.uri == f"{s3_bucket}/models/digits-test/{version}"
    loaded = B.read_bundle(result.uri, cache_dir=tmp_path)
    assert loaded.manifest == B.read_bundle(candidate).manifest
    assert storage.exists(f"{result.uri}/reports/validation.md")
    assert export(candidate, f"{s3_bucket}/models") == result  # a retry of the same candidate (KFP retries the step)
    other = _copy(candidate, tmp_path)
    _edit_manifest(other, lambda m: m.update(description="another candidate, same version"))
    with pytest.raises(ExportError, match="versions are immutable"):  # a different one is refused
        export(other, f"{s3_bucket}/models")
    assert B.read_bundle(result.uri, cache_dir=tmp_path).manifest == loaded.manifest


def test_half_uploaded_s3_bundle_is_refused(candidate: Path, s3_bucket: str) -> None:
    uri = f"{s3_bucket}/partial/v1"
    storage.upload_file(candidate / "weights" / "member-0.safetensors", f"{uri}/weights/member-0.safetensors")
    with pytest.raises(B.IncompleteBundle, match=r"no bundle\.json"):
        B.read_bundle(uri)


def test_export_to_local_folder(candidate: Path, tmp_path: Path) -> None:
    result = export(candidate, str(tmp_path / "bundles"))
    assert B.read_bundle(result.uri).version == B.read_bundle(candidate).version


def test_binary_bundle_serves_the_sweep_threshold(binary_candidate: Path) -> None:
    bundle = B.read_bundle(binary_candidate)
    assert bundle.positive_class == "eight" and bundle.classes == ("three", "eight")
    policy = bundle.policy.to_dict()
    assert policy["kind"] == "hybrid"
    threshold = policy["policies"]["threshold"]  # type: ignore[index]
    assert threshold["space"] == "calibrated" and 0 < threshold["threshold"] < 1


def test_threshold_at_half_export_keeps_every_decision(
    binary_candidate: Path, half_candidate: Path, tmp_path: Path
) -> None:
    from visionpipe.data.datasets import load_dataset
    from visionpipe.serving.calibrators import ThresholdAtHalfCalibrator

    result = export(half_candidate, str(tmp_path / "out"))
    half = B.read_bundle(result.uri)
    original = B.read_bundle(binary_candidate)
    # The half bundle is assembled by bundle_validation from the same fitted calibrator and threshold as the
    # original (validated on its own, hence another timestamp in its version): "<base version>-half".
    derived = half.manifest["threshold_at_half"]
    assert isinstance(derived, dict)
    assert half.version == str(derived["base_version"]) + "-half" and result.uri.endswith("-half")
    assert half.version.split("-")[-2] == original.version.split("-")[-1]  # the same recipe hash
    assert isinstance(half.calibrator, ThresholdAtHalfCalibrator)
    t = half.calibrator.threshold
    assert derived["threshold"] == t
    images = load_dataset(binary_candidate.parent / "ds").split("val_test", "evaluate").images
    a, b = B.BundleModel(original).predict_images(images), B.BundleModel(half).predict_images(images)
    pos = original.classes.index("eight")
    np.testing.assert_array_equal(a.decisions.labels, b.decisions.labels)
    np.testing.assert_array_equal(a.calibrated_probs[:, pos] >= t, b.calibrated_probs[:, pos] >= 0.5)
    np.testing.assert_allclose(b.calibrated_probs.sum(axis=1), 1.0)
    order = np.argsort(a.calibrated_probs[:, pos])
    assert np.all(np.diff(b.calibrated_probs[order, pos]) >= -1e-12)  # monotone remap


def test_threshold_at_half_bundle_is_published_as_validated(
    binary_candidate: Path, half_candidate: Path, tmp_path: Path
) -> None:
    """served = validated: the bundle bundle_validation checked and signed is the one export publishes, byte for
    byte; it passes the full verifying load, and its served decisions and metrics are the validated ones."""
    from visionpipe.data.datasets import load_dataset
    from visionpipe.phases.bundle_validation import split_metrics
    from visionpipe.serving import metrics as M

    result = export(half_candidate, str(tmp_path / "out"))
    published = Path(result.uri)
    validated = {p.relative_to(half_candidate): p.read_bytes() for p in half_candidate.rglob("*") if p.is_file()}
    assert {p.relative_to(published): p.read_bytes() for p in published.rglob("*") if p.is_file()} == validated
    bundle = B.read_bundle(result.uri)  # the verifying load: schema, fields, checksums, signature, policy
    assert bundle.manifest == B.read_bundle(half_candidate).manifest
    policy = bundle.policy.to_dict()
    assert policy["kind"] == "threshold" and policy["threshold"] == 0.5 and policy["space"] == "calibrated"
    report = (published / "reports" / "validation.md").read_text()
    assert "Bundle validation: PASSED" in report and "| threshold_at_half | pass |" in report
    root = binary_candidate.parent
    runtime = B.BundleModel(bundle)
    reported = bundle.manifest["metrics"]
    assert isinstance(reported, dict)
    for split in ("val_calib", "val_test"):
        data = load_dataset(root / "ds").split(split, "evaluate")
        served = runtime.predict_images(data.images)
        with np.load(root / "logits" / f"{split}.npz") as npz:
            validated_decisions = runtime.decide(M.log_softmax(np.asarray(npz["logits"], dtype=np.float64)))
        np.testing.assert_array_equal(served.decisions.labels, validated_decisions.decisions.labels)
        served_metrics = split_metrics(served, data.labels)
        for key in ("accuracy", "coverage", "mcc"):
            assert served_metrics[key] == pytest.approx(reported[split][key], abs=1e-9)


def test_threshold_at_half_refuses_multiclass(trained: Path, tmp_path: Path) -> None:
    from visionpipe.phases.bundle_validation import ThresholdAtHalfError

    with pytest.raises(ThresholdAtHalfError, match="needs a binary bundle"):
        validate(
            trained / "ds",
            trained / "model",
            trained / "logits",
            trained / "cal",
            tmp_path / "bundle",
            threshold_dir=trained / "thr",
            threshold_at_half=True,
        )
    assert not (tmp_path / "bundle").exists()  # refused before anything is written


# ------------------------------------------------------------------------------------ export on a Kubeflow cluster
# A step in a KFP executor pod must not publish to a local path (the pod's disk is deleted with the pod); the
# signal is the pair of variables the KFP v2 backend puts in every executor pod, plus the kubelet's
# KUBERNETES_SERVICE_HOST (visionpipe/phases/pod.py cites the backend code). kfp.local sets none of them.
POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KFP_POD_NAME": "training-abc-export-1", "KFP_POD_UID": "u-1"}


@pytest.mark.parametrize(
    ("env", "in_pod"),
    [
        (POD_ENV, True),
        ({}, False),
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, False),  # any pod (a notebook running kfp.local)
        ({"KFP_POD_NAME": "x", "KFP_POD_UID": "y"}, False),  # stray variables on a workstation
        ({**POD_ENV, "KFP_POD_UID": ""}, False),
    ],
)
def test_in_kfp_pod_signal(env: dict[str, str], in_pod: bool) -> None:
    from visionpipe.phases.pod import in_kfp_pod

    assert in_kfp_pod(env) is in_pod


def _pod(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in POD_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("destination", ["bundles", "/mnt/out", "file:///tmp/out", ""])
def test_export_in_a_kfp_pod_refuses_a_local_destination(
    destination: str, candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from visionpipe.phases.pod import LocalDestinationOnCluster

    _pod(monkeypatch)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LocalDestinationOnCluster) as err:
        export(candidate, destination)
    message = str(err.value)
    assert f"destination={destination!r} is not an s3:// URI" in message and "training-abc-export-1" in message
    assert "pass -p destination=s3://<bucket>/bundles" in message and "visionpipe-s3" in message
    assert list(tmp_path.iterdir()) == []  # nothing written anywhere


def test_export_component_in_a_kfp_pod_refuses_first_thing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kfp.dsl import Artifact, Markdown, Model

    from visionpipe.kfp.components.export import export as export_component
    from visionpipe.phases.pod import LocalDestinationOnCluster

    _pod(monkeypatch)
    artifacts = {
        "bundle": Model(name="bundle", uri=str(tmp_path / "no-bundle"), metadata={}),
        "published": Artifact(name="published", uri=str(tmp_path / "published"), metadata={}),
        "summary": Markdown(name="summary", uri=str(tmp_path / "summary"), metadata={}),
    }
    with pytest.raises(LocalDestinationOnCluster, match=r"-p destination=s3://<bucket>/bundles"):
        export_component.python_func(**artifacts, destination="bundles")
    assert list(tmp_path.iterdir()) == []


def test_bundle_writing_steps_in_a_kfp_pod_refuse_without_the_signing_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key generated inside a pod dies with it and no server trusts it: both steps that write a bundle refuse
    first thing, naming the Secret, unless VISIONPIPE_SIGNING_KEY is mounted."""
    from kfp.dsl import Artifact, Markdown, Model

    from visionpipe.kfp.components.bundle_validation import bundle_validation
    from visionpipe.kfp.components.export import export as export_component
    from visionpipe.phases.pod import SigningKeyMissing, require_signing_key_in_pod

    _pod(monkeypatch)
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.delenv("VISIONPIPE_SIGNING_KEY", raising=False)
    artifacts = {
        "bundle": Model(name="bundle", uri=str(tmp_path / "no-bundle"), metadata={}),
        "published": Artifact(name="published", uri=str(tmp_path / "published"), metadata={}),
        "summary": Markdown(name="summary", uri=str(tmp_path / "summary"), metadata={}),
    }
    with pytest.raises(SigningKeyMissing, match=r"Secret 'visionpipe-signing-key' with the key 'signing-key'"):
        export_component.python_func(**artifacts, destination="s3://visionpipe/bundles")
    names = [p.name for p in inspect.signature(bundle_validation.python_func).parameters.values()]
    kwargs = {n: Artifact(name=n, uri=str(tmp_path / n), metadata={}) for n in names if n not in ("champion_uri",)}
    with pytest.raises(SigningKeyMissing, match="visionpipe-signing-key"):
        bundle_validation.python_func(**{**kwargs, "champion_uri": ""})
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("VISIONPIPE_SIGNING_KEY", "present")
    require_signing_key_in_pod()  # mounted: no refusal (the key itself is checked when it signs)


def test_export_in_a_kfp_pod_publishes_to_s3(
    candidate: Path, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _pod(monkeypatch)
    result = export(candidate, f"{s3_bucket}/bundles")
    assert result.storage_uri == result.uri + "/" and storage.exists(f"{result.uri}/{B.BUNDLE_FILE}")
    assert B.read_bundle(result.storage_uri, cache_dir=tmp_path).version == result.version


def test_kfp_local_export_to_a_folder_is_not_affected(
    candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real kfp.local run of the export component (SubprocessRunner, as `visionpipe run`), even inside some pod
    (KUBERNETES_SERVICE_HOST set, as in a Kubeflow notebook), still publishes to a local folder."""
    from kfp import dsl, local

    from visionpipe.kfp.components.export import export as export_component

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    for name in ("KFP_POD_NAME", "KFP_POD_UID"):
        monkeypatch.delenv(name, raising=False)
    destination = tmp_path / "bundles"

    @dsl.pipeline(name="export-locally")
    def export_locally():  # type: ignore[no-untyped-def]  # kfp reads annotations; this module's are strings
        bundle = dsl.importer(artifact_uri=str(candidate), artifact_class=dsl.Model, reimport=False)
        export_component(bundle=bundle.output, destination=str(destination))

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "runs"), raise_on_error=True)
    export_locally()
    version = B.read_bundle(candidate).version
    assert B.read_bundle(destination / "digits-test" / version).version == version
