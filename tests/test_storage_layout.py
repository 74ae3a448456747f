"""The published layout, end to end on a real S3 server (SeaweedFS): export -> the canary's storageUri -> KServe's own
storage-initializer code downloads it -> ``python -m visionpipe.serving.server --model_dir`` serves it on loopback ->
every
val_test answer equals the validated one.

KServe's storage initializer is `kserve_storage.Storage.download_files` (the container's entry point,
python/storage-initializer/scripts/initializer-entrypoint in kserve/kserve, calls exactly that with
``[storageUri], [/mnt/models]``); the S3 download is `Storage._download_s3` (python/storage/kserve_storage/
kserve_storage.py, boto3). It reads AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_DEFAULT_REGION, S3_VERIFY_SSL and awsAnonymousCredential; KServe's webhook derives them from the Secret's data and
``serving.kserve.io/s3-*`` annotations (pkg/credentials/s3/s3_secret.go `BuildSecretEnvs`, utils.go
`BuildS3EnvVars`), which `_initializer_env` reproduces for our Secret (manifests/common/kustomization.yaml).
The KServe test needs the `kserve-storage` distribution (``kserve[storage]``); without it that one test is skipped
and the rest of the chain still runs with the predictor reading the same storageUri itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from images import png_b64
from s3server import S3Server

from visionpipe.data.datasets import load_dataset
from visionpipe.data.logits import load_logits
from visionpipe.harness import free_port, running_server
from visionpipe.phases.export import ExportResult
from visionpipe.phases.export import run as export
from visionpipe.rollout.canary import Target, start_argv
from visionpipe.serving import bundle as B
from visionpipe.serving import metrics as M
from visionpipe.serving import storage

S3_ENV = ("S3_ENDPOINT", "S3_USE_HTTPS", "S3_VERIFY_SSL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID")
S3_ENV_ALL = (*S3_ENV, "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "awsAnonymousCredential")


def _sibling(candidate: Path, out: Path, suffix: str) -> Path:
    """The candidate re-written as version `<version><suffix>` (same weights): a later bundle of the same name
    whose version starts with this one, as threshold_at_half's `<version>-half`."""
    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    manifest.pop("files")
    manifest["version"] += suffix
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    card["version"] = manifest["version"]
    B.write_bundle(out, manifest, [candidate / "weights" / "member-0.safetensors"], card)
    return out


@pytest.fixture
def published(candidate: Path, s3_bucket: str, tmp_path: Path) -> tuple[ExportResult, ExportResult]:
    """The candidate exported to s3://<bucket>/bundles, and a sibling version `<version>-half` beside it."""
    result = export(candidate, f"{s3_bucket}/bundles")
    sibling = export(_sibling(candidate, tmp_path / "sibling", "-half"), f"{s3_bucket}/bundles")
    return result, sibling


def _canary_storage_uri(result: ExportResult) -> str:
    """The storageUri that `visionpipe canary start` (and the monthly retrain's canary step, the same code)
    would patch in."""
    argv = start_argv(Target("digits"), result.storage_uri, 10)
    patch = json.loads(argv[argv.index("--patch") + 1])
    uri = patch["spec"]["predictor"]["model"]["storageUri"]
    assert isinstance(uri, str)
    return uri


def _initializer_env(server: S3Server) -> dict[str, str]:
    """The storage-initializer container's S3 variables for our Secret `visionpipe-s3`, as KServe's webhook builds
    them (BuildSecretEnvs / BuildS3EnvVars, pkg/credentials/s3/): the two keys from the Secret's data, then
    S3_USE_HTTPS / S3_ENDPOINT (host:port) / AWS_ENDPOINT_URL (a full URL) from the s3-endpoint and s3-usehttps
    annotations, S3_VERIFY_SSL, awsAnonymousCredential and AWS_DEFAULT_REGION from theirs."""
    return {
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "S3_USE_HTTPS": "0",
        "S3_ENDPOINT": server.endpoint,
        "AWS_ENDPOINT_URL": f"http://{server.endpoint}",
        "S3_VERIFY_SSL": "0",
        "awsAnonymousCredential": "false",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


def _bare_env() -> dict[str, str]:
    """This process's environment without any S3 setting (the serving container has none: it reads a folder)."""
    return {k: v for k, v in os.environ.items() if k not in S3_ENV_ALL}


def _published_files(storage_uri: str) -> set[str]:
    root = storage_uri.rstrip("/")
    return {u[len(root) + 1 :] for u in storage.list_uris(root)}


def _served_answers(
    argv: list[str], port: int, images: np.ndarray, env: dict[str, str] | None = None
) -> list[dict[str, object]]:
    """Start `argv` on loopback, send `images` as v1 requests of 50 PNGs, stop it; the predictions in order."""
    answers: list[dict[str, object]] = []
    with running_server(argv, port, timeout_s=180, env=env or _bare_env()) as server:
        for start in range(0, len(images), 50):
            body = {"instances": [{"b64": png_b64(img)} for img in images[start : start + 50]]}
            request = urllib.request.Request(
                f"{server.base_url}/v1/models/digits:predict",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=120) as answer:
                assert answer.status == 200
                answers += json.loads(answer.read())["predictions"]
    return answers


def _assert_validated(answers: list[dict[str, object]], candidate: Path, trained: Path) -> None:
    """Every served val_test answer equals what bundle_validation validated, image for image."""
    bundle = B.read_bundle(candidate)
    runtime = B.BundleModel(bundle)
    data = load_dataset(trained / "ds").split("val_test", "evaluate")
    logits, labels = load_logits(trained / "logits", "val_test")
    np.testing.assert_array_equal(labels, data.labels)
    validated = runtime.decide(M.log_softmax(logits)).decisions.labels  # bundle_validation's parity reference
    in_process = runtime.predict_images(data.images)  # the original bundle folder, in this process
    assert len(answers) == len(data.labels) > 50
    served = np.array([int(str(a["label"])) for a in answers])
    np.testing.assert_array_equal(served, validated)
    np.testing.assert_array_equal(served, in_process.decisions.labels)
    probs = np.array([[float(v) for v in a["probabilities"].values()] for a in answers])  # type: ignore[attr-defined]
    np.testing.assert_allclose(probs, in_process.calibrated_probs, atol=2e-6)
    assert {a["bundle_version"] for a in answers} == {bundle.version}
    reported = bundle.manifest["metrics"]["val_test"]  # type: ignore[index]
    decided = served >= 0
    assert abs(float(np.mean(decided)) - float(reported["coverage"])) < 1e-9


def test_kserve_storage_initializer_downloads_what_export_published(
    published: tuple[ExportResult, ExportResult],
    candidate: Path,
    trained: Path,
    s3_server: S3Server,
    tmp_path: Path,
) -> None:
    pytest.importorskip(
        "kserve_storage", reason="kserve-storage (KServe's storage initializer, kserve[storage]) is not installed"
    )
    result, sibling = published
    uri = _canary_storage_uri(result)
    assert uri == f"{result.uri}/" and sibling.uri == result.uri + "-half"
    out = tmp_path / "mnt-models"
    env = {**_bare_env(), **_initializer_env(s3_server)}
    code = "import sys; from kserve_storage import Storage; Storage.download_files([sys.argv[1]], [sys.argv[2]])"
    done = subprocess.run(
        [sys.executable, "-c", code, uri, str(out)], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    downloaded = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert downloaded == _published_files(uri)  # exactly this bundle: not the `-half` sibling's files
    assert B.read_bundle(out).manifest == B.read_bundle(candidate).manifest
    port = free_port()
    argv = [sys.executable, "-m", "visionpipe.serving.server", "--model_dir", str(out), "--model_name", "digits"]
    images = load_dataset(trained / "ds").split("val_test", "evaluate").images
    _assert_validated(_served_answers([*argv, f"--http_port={port}"], port, images), candidate, trained)


def test_storage_uri_without_slash_would_also_match_the_sibling_version(
    published: tuple[ExportResult, ExportResult], s3_server: S3Server
) -> None:
    """Why `storage_uri` ends with '/': S3 prefixes are plain string prefixes (ListObjects ``prefix``, what KServe's
    ``bucket.objects.filter(Prefix=...)`` sends), so ``.../<version>`` also lists ``.../<version>-half/...``."""
    from minio import Minio

    result, sibling = published
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False)
    bucket, key = storage.split_s3(result.uri)

    def listed(prefix: str) -> set[str]:
        return {o.object_name for o in client.list_objects(bucket, prefix=prefix, recursive=True) if o.object_name}

    _, sibling_key = storage.split_s3(sibling.uri)
    assert any(name.startswith(sibling_key + "/") for name in listed(key))  # the hazard
    exact = listed(storage.split_s3(result.storage_uri)[1])
    assert exact and all(name.startswith(key + "/") for name in exact)
    assert {name[len(key) + 1 :] for name in exact} == _published_files(result.storage_uri)
    assert all(size > 0 for size in _sizes(client, bucket, exact))  # KServe skips zero-byte objects


def _sizes(client: object, bucket: str, names: set[str]) -> list[int]:
    from minio import Minio

    assert isinstance(client, Minio)
    return [int(client.stat_object(bucket, name).size or 0) for name in sorted(names)]


def test_predictor_serves_the_canary_storage_uri_like_the_validated_bundle(
    published: tuple[ExportResult, ExportResult],
    candidate: Path,
    trained: Path,
    s3_server: S3Server,
) -> None:
    """The same chain without KServe's downloader: the predictor reads the canary's storageUri from S3 itself."""
    result, _ = published
    uri = _canary_storage_uri(result)
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "visionpipe.serving.server",
        "--bundle",
        uri,
        "--model_name",
        "digits",
        f"--http_port={port}",
    ]
    images = load_dataset(trained / "ds").split("val_test", "evaluate").images
    answers = _served_answers(argv, port, images, {**_bare_env(), **s3_server.env()})
    _assert_validated(answers, candidate, trained)
