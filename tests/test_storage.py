"""Storage on local paths and on a real S3 server (SeaweedFS on loopback, authentication on)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from s3server import S3Server

from serving import storage


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
