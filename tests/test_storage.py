"""Storage on local paths and on a real S3 server (SeaweedFS on loopback, authentication on)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from s3server import S3Server

from visionpipe.serving import storage


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "store")
    bucket: str = request.getfixturevalue("s3_bucket")
    return bucket + "/prefix"


def test_write_read_exists_list_round_trip(root: str) -> None:
    a, b = storage.join(root, "x", "a.bin"), storage.join(root, "x", "y", "b.txt")
    assert not storage.exists(a)
    storage.write_bytes(a, b"\x00\x01payload")
    storage.write_bytes(b, b"hello")
    assert storage.exists(a) and storage.exists(b)
    assert storage.read_bytes(a) == b"\x00\x01payload"
    assert storage.list_uris(storage.join(root, "x")) == sorted([a, b])
    assert storage.sha256_of(b) == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"


def test_missing_object_is_object_not_found(root: str) -> None:
    storage.write_bytes(storage.join(root, "present"), b"1")
    with pytest.raises(storage.ObjectNotFound):
        storage.read_bytes(storage.join(root, "absent"))


def test_download_prefix_keeps_relative_layout(root: str, tmp_path: Path) -> None:
    storage.write_bytes(storage.join(root, "m", "bundle.json"), b"{}")
    storage.write_bytes(storage.join(root, "m", "w", "model.safetensors"), b"w")
    local = storage.download_prefix(storage.join(root, "m"), tmp_path / "copy")
    assert (local / "bundle.json").read_bytes() == b"{}"
    assert (local / "w" / "model.safetensors").read_bytes() == b"w"


def test_download_prefix_refuses_keys_that_escape_the_folder(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SeaweedFS and the minio client both refuse to store `m/../../evil`, but an S3 key is any string on other
    # servers: a hostile listing is simulated here, and nothing may be written outside the download folder.
    prefix = storage.join(s3_bucket, "m")
    storage.write_bytes(prefix + "/bundle.json", b"{}")
    for hostile in ("../../evil", "/abs", "a//b", "./x"):
        monkeypatch.setattr(storage, "list_uris", lambda _p, h=hostile: [prefix + "/bundle.json", f"{prefix}/{h}"])
        with pytest.raises(storage.StorageError, match="escapes the download folder"):
            storage.download_prefix(prefix, tmp_path / "a" / "b" / "copy")
    assert not (tmp_path / "a" / "evil").exists() and not (tmp_path / "a" / "b" / "copy").exists()


def test_upload_and_download_file(root: str, tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 100)
    uri = storage.join(root, "up", "src.bin")
    storage.upload_file(src, uri)
    out = storage.download_file(uri, tmp_path / "dl" / "src.bin")
    assert out.read_bytes() == src.read_bytes()


def test_wrong_credentials_give_clear_auth_error(
    s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.S3AuthError) as err:
        storage.read_bytes(s3_bucket + "/anything")
    message = str(err.value)
    assert s3_bucket in message and "AWS_SECRET_ACCESS_KEY" in message
    assert s3_server.secret_key not in message and "not-the-secret" not in message


def test_missing_bucket_is_named(s3_env: S3Server) -> None:
    with pytest.raises(storage.S3BucketMissing, match=r"vp-no-such-bucket-xyz.*bucket does not exist"):
        storage.write_bytes("s3://vp-no-such-bucket-xyz/key", b"1")


def test_unreachable_endpoint_retries_then_names_endpoint(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("S3_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("VISIONPIPE_S3_ATTEMPTS", "3")
    started = time.monotonic()
    with pytest.raises(storage.S3ConnectionError) as err:
        storage.read_bytes("s3://bucket/key")
    assert "cannot reach the S3 endpoint http://127.0.0.1:9" in str(err.value)
    assert "S3_ENDPOINT" in str(err.value)
    assert capsys.readouterr().out.count("retry") == 2  # two backoffs between three attempts
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("uri", ["s3://", "s3:///key"])
def test_malformed_s3_uri(uri: str) -> None:
    with pytest.raises(storage.StorageError, match="no bucket name"):
        storage.split_s3(uri)


def test_invalid_bucket_name_is_a_storage_error(s3_env: S3Server) -> None:
    with pytest.raises(storage.StorageError, match=r"s3://b/key: invalid bucket name b .*3-63 lower-case"):
        storage.read_bytes("s3://b/key")


# --------------------------------------------------------------------------------------------- fail closed
S3_VARS = ("S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_USE_HTTPS")
SENTINEL_KEY, SENTINEL_SECRET = "AKIA-sentinel-key-id", "sentinel-secret-never-shown"


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening loopback socket that counts as the S3 endpoint: any connection to it would be 'work'."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        s.setblocking(False)
        yield s


def _connections(listener: socket.socket) -> int:
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


@pytest.mark.parametrize(
    ("present", "missing"),
    [
        ((), ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
        (("S3_ENDPOINT",), ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")),
        (("S3_ENDPOINT", "AWS_ACCESS_KEY_ID"), ("AWS_SECRET_ACCESS_KEY",)),
        (("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), ("S3_ENDPOINT",)),
    ],
)
def test_missing_settings_refuse_before_any_connection(
    present: tuple[str, ...], missing: tuple[str, ...], listener: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = {
        "S3_ENDPOINT": f"http://127.0.0.1:{listener.getsockname()[1]}",
        "AWS_ACCESS_KEY_ID": SENTINEL_KEY,
        "AWS_SECRET_ACCESS_KEY": SENTINEL_SECRET,
    }
    for name in S3_VARS:
        monkeypatch.delenv(name, raising=False)
    for name in present:
        monkeypatch.setenv(name, values[name])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY" if "AWS_SECRET_ACCESS_KEY" in missing else "UNUSED", "  ")  # blank
    calls: list[Callable[[], object]] = [
        lambda: storage.read_bytes("s3://bucket/key"),
        lambda: storage.write_bytes("s3://bucket/key", b"1"),
        lambda: storage.exists("s3://bucket/key"),
        lambda: storage.list_uris("s3://bucket/prefix"),
        lambda: storage.ensure_bucket("s3://bucket"),
        lambda: storage.require_s3_credentials("builtin://sklearn-digits", "s3://bucket/key"),
    ]
    for call in calls:
        with pytest.raises(storage.S3CredentialsMissing) as err:
            call()
        message = str(err.value)
        assert err.value.missing == missing
        assert f"missing from the environment: {', '.join(missing)}" in message
        assert "Kubernetes Secret 'visionpipe-s3'" in message and "anonymous access is never tried" in message
        assert "s3://bucket" in message
        assert SENTINEL_KEY not in message and SENTINEL_SECRET not in message
    assert _connections(listener) == 0  # no request was sent: not even an anonymous one


def test_require_s3_credentials_ignores_uris_that_need_no_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in S3_VARS:
        monkeypatch.delenv(name, raising=False)
    storage.require_s3_credentials("", "builtin://sklearn-digits", str(tmp_path), "bundles")
    with pytest.raises(storage.S3CredentialsMissing, match=r"s3://a/x, s3://b/y: S3 settings missing"):
        storage.require_s3_credentials("s3://a/x", str(tmp_path), "s3://b/y")


def test_aws_endpoint_url_stands_in_for_s3_endpoint(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """KServe's webhook sets AWS_ENDPOINT_URL beside S3_ENDPOINT (pkg/credentials/s3/utils.go); either works."""
    endpoint = storage.s3_settings_from_env().describe()
    monkeypatch.delenv("S3_ENDPOINT")
    monkeypatch.delenv("S3_USE_HTTPS")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    storage.write_bytes(f"{s3_bucket}/via-aws-endpoint-url", b"ok")
    assert storage.read_bytes(f"{s3_bucket}/via-aws-endpoint-url") == b"ok"


def test_components_refuse_first_thing_without_s3_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each component body checks its s3:// parameters before touching any input or output."""
    from kfp.dsl import HTML, Artifact, Dataset, Markdown, Metrics, Model

    from visionpipe.kfp.components.bundle_validation import bundle_validation
    from visionpipe.kfp.components.data_fetch import data_fetch
    from visionpipe.kfp.components.export import export
    from visionpipe.kfp.components.supervised_train import supervised_train

    for name in S3_VARS:
        monkeypatch.delenv(name, raising=False)

    def art(kind: type[Artifact], name: str) -> Artifact:
        return kind(name=name, uri=str(tmp_path / name), metadata={})

    calls: dict[str, Callable[[], object]] = {
        "data_fetch": lambda: data_fetch.python_func(
            dataset=art(Dataset, "ds"), summary=art(Markdown, "sum"), source="s3://data/digits"
        ),
        "export": lambda: export.python_func(
            bundle=art(Model, "bundle"),
            published=art(Artifact, "pub"),
            summary=art(Markdown, "sum"),
            destination="s3://models/bundles",
        ),
        "supervised_train": lambda: supervised_train.python_func(
            dataset=art(Dataset, "ds"),
            model=art(Model, "model"),
            logits=art(Artifact, "logits"),
            metrics=art(Metrics, "metrics"),
            curve=art(HTML, "curve"),
            recipe="no-such-recipe",  # would fail with another error if the check were not first
            checkpoint_uri="s3://ckpt/prefix",
        ),
        "bundle_validation": lambda: bundle_validation.python_func(
            dataset=art(Dataset, "ds"),
            model=art(Model, "model"),
            logits=art(Artifact, "logits"),
            threshold=art(Artifact, "thr"),
            calibration=art(Artifact, "cal"),
            bundle=art(Model, "bundle"),
            report=art(Markdown, "report"),
            metrics=art(Metrics, "metrics"),
            champion_uri="s3://models/bundles/digits/v1",
        ),
    }
    for name, call in calls.items():
        with pytest.raises(storage.S3CredentialsMissing) as err:
            call()
        assert "visionpipe-s3" in str(err.value) and "AWS_ACCESS_KEY_ID" in str(err.value), name
    assert list(tmp_path.iterdir()) == []  # nothing written by any of them


def test_core_entry_points_refuse_without_s3_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from visionpipe.phases.data_fetch import run as fetch
    from visionpipe.phases.export import run as export
    from visionpipe.serving.bundle import read_bundle

    for name in S3_VARS:
        monkeypatch.delenv(name, raising=False)
    calls: list[Callable[[], object]] = [
        lambda: fetch("s3://data/digits", tmp_path / "ds"),
        lambda: export(tmp_path / "no-bundle-here", "s3://models/bundles"),  # refused before reading the bundle
        lambda: read_bundle("s3://models/bundles/digits/v1", cache_dir=tmp_path / "cache"),
    ]
    for call in calls:
        with pytest.raises(storage.S3CredentialsMissing) as err:
            call()
        assert "Kubernetes Secret 'visionpipe-s3'" in str(err.value)
        assert err.value.missing == ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    assert not (tmp_path / "ds").exists()


# --------------------------------------------------------------------------------------------- named causes
def test_unknown_access_key_is_named(s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIA-not-a-known-key")
    with pytest.raises(storage.S3AuthError) as err:
        storage.read_bytes(s3_bucket + "/anything")
    message = str(err.value)
    assert "InvalidAccessKeyId" in message and "does not know this access key" in message
    assert "AKIA-not-a-known-key" not in message and s3_server.secret_key not in message


def test_wrong_secret_is_named(s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(storage.S3AuthError) as err:
        storage.write_bytes(s3_bucket + "/anything", b"1")
    message = str(err.value)
    assert "SignatureDoesNotMatch" in message and "secret key does not match" in message
    assert "visionpipe-s3" in message and "not-the-secret" not in message


@pytest.mark.parametrize(
    ("status", "content_type", "requests"),
    [(404, "text/plain", 1), (302, "text/html", 1), (403, "text/html", 1), (502, "text/html", 3)],
)
def test_endpoint_that_is_not_s3_is_named(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch, status: int, content_type: str, requests: int
) -> None:
    """A wrong port that answers HTTP (a console, a UI, a proxy) is not a connection failure nor a missing object.

    (A page served with HTTP 200 cannot be told from an object: minio accepts any 200 answer to a GET.)"""
    hits: list[str] = []

    class Page(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            return

        def _answer(self) -> None:
            hits.append(self.command)
            body = b"<html>Sign in to the console " + s3_env.access_key.encode() + b"</html>"
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_PUT = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("VISIONPIPE_S3_ATTEMPTS", "3")
        for call in (lambda: storage.read_bytes("s3://bucket/key"), lambda: storage.write_bytes("s3://bkt/k", b"1")):
            with pytest.raises(storage.S3EndpointError) as err:
                call()
            message = str(err.value)
            assert f"answered HTTP {status}" in message and "not an S3 API" in message and "S3_ENDPOINT" in message
            assert "Sign in" not in message and s3_env.access_key not in message
    finally:
        server.shutdown()
        server.server_close()
    assert len(hits) == 2 * requests  # 4xx pages: one request each; a proxy's 5xx page: retried, then named


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("http://127.0.0.1:99999", "invalid port"),
        ("127.0.0.1:99999", "invalid port"),
        ("minio:abc", "invalid port"),
        ("http://admin:hunter2@minio:9000", "user information"),
        ("admin:hunter2@minio:9000", "user information"),
        ("ftp://minio:21", "not a ftp:// URL"),
        ("http://minio:9000/bucket", "must not carry a path"),
        ("http://:9000", "names no host"),
        ("minio:0", "port 0"),
    ],
)
def test_malformed_endpoint_gets_its_own_message(
    endpoint: str, message: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from visionpipe.cli import main

    monkeypatch.setenv("S3_ENDPOINT", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-secret")
    with pytest.raises(storage.S3EndpointMalformed, match=message) as err:
        storage.read_bytes("s3://bucket/key")
    assert "hunter2" not in str(err.value) and "S3_ENDPOINT" in str(err.value)
    assert main(["validate-bundle", "s3://bucket/bundles/digits/v1/"]) == 1  # every command: the same message
    captured = capsys.readouterr()
    assert message in captured.out + captured.err and "hunter2" not in captured.out + captured.err
    assert "Traceback" not in captured.out + captured.err


def test_well_formed_endpoints_parse() -> None:
    assert storage.parse_endpoint("minio-service.kubeflow:9000", secure=False) == ("minio-service.kubeflow:9000", False)
    assert storage.parse_endpoint("https://s3.amazonaws.com") == ("s3.amazonaws.com", True)
    assert storage.parse_endpoint("http://127.0.0.1:8333/") == ("127.0.0.1:8333", False)
