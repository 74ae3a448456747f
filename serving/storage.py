"""Read, write, list and test objects on local paths and ``s3://bucket/key`` URIs (MinIO or any S3 server).

S3 settings come from the environment, with the names KServe's storage initializer uses (the
``serving.kserve.io/s3-*`` annotations of a service account become these variables), so one Secret serves
both the pipeline and the InferenceService:

    S3_ENDPOINT            host:port, or a URL (http://minio-service.kubeflow:9000); default s3.amazonaws.com
    S3_USE_HTTPS           1 / 0; default 1, or taken from the URL's scheme
    S3_VERIFY_SSL          1 / 0; default 1
    AWS_ACCESS_KEY_ID      access key (unset = anonymous)
    AWS_SECRET_ACCESS_KEY  secret key
    AWS_REGION / AWS_DEFAULT_REGION   default us-east-1
    VISIONPIPE_S3_ATTEMPTS  attempts for transient failures (default 4, exponential backoff)

Transient failures (connection errors, timeouts, 5xx, SlowDown) are retried with backoff; a wrong endpoint,
wrong credentials or a missing bucket end in one `StorageError` naming the URI and the cause. Credentials are
never logged or put in messages. Lives in `serving/` because both the pipeline and the predictor use it.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from minio import Minio

T = TypeVar("T")

_TRANSIENT_S3_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"})
_AUTH_S3_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
)


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""


class S3ConnectionError(StorageError):
    """The S3 endpoint could not be reached."""


class S3AuthError(StorageError):
    """The S3 server refused the credentials."""


class S3BucketMissing(StorageError):
    """The bucket named in the URI does not exist."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object / file at that URI."""


@dataclass(frozen=True)
class S3Settings:
    endpoint: str
    secure: bool
    verify: bool
    access_key: str
    secret_key: str
    region: str

    def describe(self) -> str:
        """Endpoint description safe for messages (no credentials)."""
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


def s3_settings_from_env() -> S3Settings:
    raw = os.environ.get("S3_ENDPOINT", "s3.amazonaws.com").strip()
    secure = _flag("S3_USE_HTTPS", True)
    if "://" in raw:
        parsed = urlparse(raw)
        secure = parsed.scheme == "https"
        raw = parsed.netloc
    return S3Settings(
        endpoint=raw,
        secure=secure,
        verify=_flag("S3_VERIFY_SSL", True),
        access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key)."""
    if not is_s3(uri):
        raise StorageError(f"{uri}: not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"{uri}: no bucket name (expected s3://bucket/key)")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join URI / path parts with '/' (works for both s3:// URIs and local paths)."""
    out = base.rstrip("/")
    for p in parts:
        out += "/" + p.strip("/")
    return out


# --------------------------------------------------------------------------------------------- API


def read_bytes(uri: str) -> bytes:
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_file():
            raise ObjectNotFound(f"{uri}: no such file")
        return path.read_bytes()
    bucket, key = split_s3(uri)

    def op() -> bytes:
        response = _client().get_object(bucket, key)
        try:
            return bytes(response.read())
        finally:
            response.close()
            response.release_conn()

    return _s3_call(uri, op)


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` (local writes are atomic: temp file + rename)."""
    if not is_s3(uri):
        path = _local(uri)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as tmp:
            tmp.write(data)
        os.replace(tmp.name, path)
        return
    import io

    bucket, key = split_s3(uri)
    _s3_call(uri, lambda: _client().put_object(bucket, key, io.BytesIO(data), len(data)))


def exists(uri: str) -> bool:
    if not is_s3(uri):
        return _local(uri).exists()
    bucket, key = split_s3(uri)
    try:
        _s3_call(uri, lambda: _client().stat_object(bucket, key))
    except ObjectNotFound:
        return False
    return True


def list_uris(prefix: str) -> list[str]:
    """Every object (file) below `prefix`, recursively, as full URIs / paths, sorted."""
    if not is_s3(prefix):
        root = _local(prefix)
        if not root.is_dir():
            raise ObjectNotFound(f"{prefix}: no such directory")
        return sorted(str(p) for p in root.rglob("*") if p.is_file())
    bucket, key = split_s3(prefix)
    key = key.rstrip("/") + "/" if key else ""

    def op() -> list[str]:
        objects = _client().list_objects(bucket, prefix=key, recursive=True)
        return sorted(f"s3://{bucket}/{o.object_name}" for o in objects if not o.is_dir)

    return _s3_call(prefix, op)


def delete(uri: str) -> None:
    """Remove one object / file; a missing one is not an error."""
    if not is_s3(uri):
        _local(uri).unlink(missing_ok=True)
        return
    bucket, key = split_s3(uri)
    _s3_call(uri, lambda: _client().remove_object(bucket, key))


def upload_file(local: Path, uri: str) -> None:
    if not is_s3(uri):
        write_bytes(uri, local.read_bytes())
        return
    bucket, key = split_s3(uri)
    _s3_call(uri, lambda: _client().fput_object(bucket, key, str(local)))


def download_file(uri: str, local: Path) -> Path:
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(read_bytes(uri))
    return local


def download_prefix(uri: str, local_dir: Path) -> Path:
    """Copy every object below `uri` into `local_dir` (keeping relative paths); returns `local_dir`.

    A local `uri` that is a directory is returned as it is (nothing copied)."""
    if not is_s3(uri):
        path = _local(uri)
        if not path.is_dir():
            raise ObjectNotFound(f"{uri}: no such directory")
        return path
    root = uri.rstrip("/")
    objects = list_uris(root)
    if not objects:
        raise ObjectNotFound(f"{uri}: no objects under this prefix")
    for obj in objects:
        download_file(obj, local_dir / obj[len(root) + 1 :])
    return local_dir


def sha256_of(uri: str) -> str:
    return hashlib.sha256(read_bytes(uri)).hexdigest()


def ensure_bucket(uri: str) -> None:
    """Create the bucket of an s3:// URI if it is missing (tests and first-time setups)."""
    bucket, _ = split_s3(uri)

    def op() -> None:
        if not _client().bucket_exists(bucket):
            _client().make_bucket(bucket)

    _s3_call(uri, op)


# ------------------------------------------------------------------------------------------ internals


def _local(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def _client() -> Minio:
    return _cached_client(s3_settings_from_env())


@lru_cache(maxsize=8)
def _cached_client(settings: S3Settings) -> Minio:
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=60.0),
        retries=urllib3.Retry(total=0, connect=0, read=0, redirect=0),
        cert_reqs="CERT_REQUIRED" if settings.verify else "CERT_NONE",
    )
    return Minio(
        settings.endpoint,
        access_key=settings.access_key or None,
        secret_key=settings.secret_key or None,
        secure=settings.secure,
        region=settings.region,
        http_client=http,
    )


def _s3_call(uri: str, op: Callable[[], T]) -> T:
    """Run `op`, retrying transient failures with exponential backoff; map failures to named errors."""
    import urllib3.exceptions
    from minio.error import S3Error, ServerError

    attempts = max(1, int(os.environ.get("VISIONPIPE_S3_ATTEMPTS", "4")))
    settings = s3_settings_from_env()
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except S3Error as exc:
            if exc.code not in _TRANSIENT_S3_CODES or attempt == attempts:
                raise _named_s3_error(uri, exc.code or "", exc.message or "", settings) from exc
            cause = exc.code
        except ServerError as exc:
            if attempt == attempts:
                raise StorageError(
                    f"{uri}: S3 server {settings.describe()} failed with HTTP {exc.status_code} "
                    f"after {attempts} attempts"
                ) from exc
            cause = f"HTTP {exc.status_code}"
        except StorageError:
            raise
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            if not _is_connection_problem(exc) or attempt == attempts:
                raise S3ConnectionError(
                    f"{uri}: cannot reach the S3 endpoint {settings.describe()} after {attempt} attempt(s): "
                    f"{_short(exc)}. Check S3_ENDPOINT / S3_USE_HTTPS and that the server is running."
                ) from exc
            cause = _short(exc)
        delay = 0.25 * 2 ** (attempt - 1) * (1 + random.random() / 4)
        print(f"storage: transient failure on {uri} ({cause}); retry {attempt}/{attempts - 1} in {delay:.2f}s")
        time.sleep(delay)
    raise AssertionError("unreachable")


def _named_s3_error(uri: str, code: str, message: str, settings: S3Settings) -> StorageError:
    where = f"{uri} on {settings.describe()}"
    if code == "NoSuchBucket":
        return S3BucketMissing(f"{where}: bucket does not exist. Create it, or fix the bucket name in the URI.")
    if code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
        return ObjectNotFound(f"{where}: no such object")
    if code in _AUTH_S3_CODES:
        hint = (
            "no credentials are set (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)"
            if not settings.access_key
            else "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the Kubernetes secret they come from)"
        )
        return S3AuthError(f"{where}: the server refused the credentials ({code}); {hint}.")
    return StorageError(f"{where}: {code}: {message}")


def _is_connection_problem(exc: BaseException) -> bool:
    import urllib3.exceptions as ux

    return isinstance(exc, ConnectionError | TimeoutError | ux.HTTPError)


def _short(exc: BaseException) -> str:
    text = str(exc.__cause__ or exc) if not str(exc) else str(exc)
    for marker in ("Connection refused", "Name or service not known", "timed out", "No route to host"):
        if marker in text:
            return marker
    return text[:200]
