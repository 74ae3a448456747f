"""Read, write, list and test objects on local paths and ``s3://bucket/key`` URIs (MinIO or any S3 server).

S3 settings come from the environment, with the names KServe's storage initializer uses (the
``serving.kserve.io/s3-*`` annotations of a service account become these variables), so one Secret serves
both the pipeline and the InferenceService:

    S3_ENDPOINT            host:port, or a URL (http://minio-service.kubeflow:9000); required (AWS_ENDPOINT_URL,
                           which KServe's webhook sets beside it, is accepted instead); for AWS: s3.amazonaws.com
    S3_USE_HTTPS           1 / 0; default 1, or taken from the URL's scheme
    S3_VERIFY_SSL          1 / 0; default 1
    AWS_ACCESS_KEY_ID      access key (required)
    AWS_SECRET_ACCESS_KEY  secret key (required)
    AWS_REGION / AWS_DEFAULT_REGION   default us-east-1
    VISIONPIPE_S3_ATTEMPTS  attempts for transient failures (default 4, exponential backoff)

Fail closed: no S3 client is ever built without an endpoint and both keys, so a step whose Kubernetes Secret
(`S3_SECRET`, mounted with ``optional=True``) is missing or incomplete stops at once with `S3CredentialsMissing`
naming the Secret and the missing keys, instead of trying anonymous access. Component bodies call
`require_s3_credentials(...)` first thing with every s3:// parameter.

Transient failures (connection errors, timeouts, 5xx, SlowDown) are retried with backoff; a wrong endpoint
(nothing listens, or something that is not S3 answers), wrong credentials (unknown access key, wrong secret, or
valid keys without access) or a missing bucket end in one `StorageError` subclass naming the URI and the cause.
Credentials are never logged or put in messages. Lives in `serving/` because both the pipeline and the
predictor use it (and it imports nothing heavy: the pipeline definitions import its constants).
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlparse

if TYPE_CHECKING:
    from minio import Minio

T = TypeVar("T")

S3_SECRET = "visionpipe-s3"
"""The Kubernetes Secret holding the S3 settings (manifests/common); the pipeline mounts it as environment variables."""
S3_SECRET_KEYS: dict[str, str] = {
    "S3_ENDPOINT": "S3_ENDPOINT",
    "S3_USE_HTTPS": "S3_USE_HTTPS",
    "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
}
"""Environment variable -> key of `S3_SECRET` (``kfp.kubernetes.use_secret_as_env(secret_key_to_env=...)``)."""
REQUIRED_S3_SETTINGS = ("S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
"""Without these no S3 client is built (no anonymous access, no guessed endpoint)."""

_TRANSIENT_S3_CODES = frozenset({"InternalError", "SlowDown", "ServiceUnavailable", "RequestTimeout"})
_AUTH_S3_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "ExpiredToken"}
)


class StorageError(OSError):
    """A storage operation failed; the message names the URI and the cause."""


class S3CredentialsMissing(StorageError):
    """S3 settings are missing from the environment; nothing was attempted (never anonymous access)."""

    def __init__(self, message: str, missing: tuple[str, ...]) -> None:
        super().__init__(message)
        self.missing = missing


class S3ConnectionError(StorageError):
    """The S3 endpoint could not be reached."""


class S3EndpointError(S3ConnectionError):
    """Something answers at the S3 endpoint, but it is not an S3 API (a console, a UI, a proxy's page)."""


class S3EndpointMalformed(StorageError):
    """S3_ENDPOINT / AWS_ENDPOINT_URL is not a usable host[:port] or URL (the message never repeats userinfo)."""


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


def missing_s3_settings(environ: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The names in `REQUIRED_S3_SETTINGS` that are unset or empty (AWS_ENDPOINT_URL stands in for S3_ENDPOINT)."""
    env = os.environ if environ is None else environ

    def present(name: str) -> bool:
        return bool(env.get(name, "").strip())

    missing = [name for name in REQUIRED_S3_SETTINGS if not present(name)]
    if "S3_ENDPOINT" in missing and present("AWS_ENDPOINT_URL"):
        missing.remove("S3_ENDPOINT")
    return tuple(missing)


def require_s3_credentials(*uris: str) -> None:
    """Fail at once, naming the Secret and the missing keys, when any of `uris` is s3:// and S3 settings are missing.

    Non-s3 URIs (local paths, ``builtin://``, empty strings) need nothing. Called first thing by every KFP component
    body with its s3:// parameters, so a step without its Secret fails before doing any work."""
    s3_uris = [u for u in uris if isinstance(u, str) and is_s3(u)]
    if not s3_uris:
        return
    missing = missing_s3_settings()
    if missing:
        raise credentials_missing(", ".join(s3_uris), missing)


def credentials_missing(what: str, missing: tuple[str, ...]) -> S3CredentialsMissing:
    keys = ", ".join(S3_SECRET_KEYS.values())
    return S3CredentialsMissing(
        f"{what}: S3 settings missing from the environment: {', '.join(missing)} (anonymous access is never "
        f"tried). On Kubeflow they come from the Kubernetes Secret '{S3_SECRET}' (keys {keys}) in the run's "
        f"namespace: create it (kubectl create secret generic {S3_SECRET} -n <namespace> "
        f"--from-literal=AWS_ACCESS_KEY_ID=... --from-literal=AWS_SECRET_ACCESS_KEY=... "
        f"--from-literal=S3_ENDPOINT=<host:port>) or add the missing keys; locally, export the same variables.",
        missing,
    )


def s3_settings_from_env() -> S3Settings:
    name = "S3_ENDPOINT" if os.environ.get("S3_ENDPOINT", "").strip() else "AWS_ENDPOINT_URL"
    raw = os.environ.get(name, "").strip()
    endpoint, secure = parse_endpoint(raw, name, _flag("S3_USE_HTTPS", True))
    return S3Settings(
        endpoint=endpoint,
        secure=secure,
        verify=_flag("S3_VERIFY_SSL", True),
        access_key=os.environ.get("AWS_ACCESS_KEY_ID", ""),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY", ""),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
    )


def parse_endpoint(raw: str, name: str = "S3_ENDPOINT", secure: bool = True) -> tuple[str, bool]:
    """`host[:port]` (and https or not) from an endpoint setting: a URL or a bare host:port. Refuses a scheme
    other than http(s), user:password@ in the URL (credentials belong in AWS_*; never echoed), a path, and a port
    outside 1..65535, each with its own message. An empty value stays empty (reported as missing elsewhere)."""
    if not raw:
        return "", secure
    text = raw if "://" in raw else f"{'https' if secure else 'http'}://{raw}"
    try:
        parsed = urlparse(text)
        port = parsed.port  # raises ValueError on a non-numeric or out-of-range port
    except ValueError:
        raise S3EndpointMalformed(
            f"{name} has an invalid port (a number from 1 to 65535 expected), e.g. minio-service.kubeflow:9000"
        ) from None
    if parsed.scheme not in ("http", "https"):
        raise S3EndpointMalformed(f"{name} must be host:port or an http(s):// URL, not a {parsed.scheme}:// URL")
    if "@" in parsed.netloc:
        raise S3EndpointMalformed(
            f"{name} carries user information (user:password@); put the keys in AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY and give the endpoint as host:port"
        )
    if not parsed.hostname:
        raise S3EndpointMalformed(f"{name} names no host; expected host:port, e.g. minio-service.kubeflow:9000")
    if parsed.path not in ("", "/") or parsed.query or parsed.fragment:
        raise S3EndpointMalformed(
            f"{name} must not carry a path or query; expected host:port (the bucket is in the s3:// URI)"
        )
    if port == 0:
        raise S3EndpointMalformed(f"{name} has port 0; a number from 1 to 65535 expected")
    return parsed.netloc, parsed.scheme == "https"


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


def upload_prefix(local_dir: Path, uri: str) -> list[str]:
    """Copy every file below `local_dir` to `uri` (keeping relative paths, sorted); returns the URIs written."""
    written = []
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        target = join(uri, path.relative_to(local_dir).as_posix())
        upload_file(path, target)
        written.append(target)
    return written


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
    base = local_dir.resolve()
    for obj in objects:
        rel = obj[len(root) + 1 :]
        target = (base / rel).resolve()
        parts = rel.split("/")
        # An object key is any string: one with `..`, an empty segment or a leading `/` could write outside
        # local_dir. Refuse it instead of following it.
        if not rel or "" in parts or ".." in parts or "." in parts or not target.is_relative_to(base):
            raise StorageError(f"{obj}: object key escapes the download folder; refusing to download {uri}")
    for obj in objects:
        download_file(obj, base / obj[len(root) + 1 :])
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
    missing = missing_s3_settings()
    if missing:  # never an anonymous client, never a guessed endpoint
        raise credentials_missing("S3 client", missing)
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
    if not (settings.endpoint and settings.access_key and settings.secret_key):
        raise credentials_missing("S3 client", missing_s3_settings() or REQUIRED_S3_SETTINGS)
    return Minio(
        settings.endpoint,
        access_key=settings.access_key,
        secret_key=settings.secret_key,
        secure=settings.secure,
        region=settings.region,
        http_client=http,
    )


def _s3_call(uri: str, op: Callable[[], T]) -> T:
    """Run `op`, retrying transient failures with exponential backoff; map failures to named errors."""
    import urllib3.exceptions
    from minio.error import InvalidResponseError, S3Error, ServerError

    require_s3_credentials(uri)  # before any connection: never anonymous, never a guessed endpoint
    attempts = max(1, int(os.environ.get("VISIONPIPE_S3_ATTEMPTS", "4")))
    settings = s3_settings_from_env()
    for attempt in range(1, attempts + 1):
        try:
            return op()
        except S3Error as exc:
            if exc.code not in _TRANSIENT_S3_CODES or attempt == attempts:
                raise _named_s3_error(uri, exc.code or "", exc.message or "", settings) from exc
            cause = exc.code
        except InvalidResponseError as exc:
            # minio raises this when the answer is not S3's XML (minio/api.py `_url_open`): not an S3 API, or a
            # proxy's error page (5xx: retried, a restarting server behind an ingress). The body is left out of the
            # message (a login page could echo anything).
            status, content_type = getattr(exc, "_code", 0), getattr(exc, "_content_type", None) or "no type"
            if not (isinstance(status, int) and status >= 500) or attempt == attempts:
                raise S3EndpointError(
                    f"{uri}: the S3 endpoint {settings.describe()} answered HTTP {status} ({content_type}) after "
                    f"{attempt} attempt(s), which is not an S3 API answer: S3_ENDPOINT points at another service "
                    f"(a web console or UI port, a proxy?). Use the S3 API port (MinIO: 9000) and check "
                    f"S3_USE_HTTPS."
                ) from None
            cause = f"HTTP {status} ({content_type})"
        except ServerError as exc:
            if exc.status_code < 500:
                raise S3EndpointError(
                    f"{uri}: the S3 endpoint {settings.describe()} answered HTTP {exc.status_code} without an S3 "
                    f"error: is S3_ENDPOINT the S3 API (MinIO: port 9000)?"
                ) from exc
            if attempt == attempts:
                raise StorageError(
                    f"{uri}: S3 server {settings.describe()} failed with HTTP {exc.status_code} "
                    f"after {attempts} attempts"
                ) from exc
            cause = f"HTTP {exc.status_code}"
        except StorageError:
            raise
        except ValueError as exc:  # minio's argument checks, e.g. "invalid bucket name b" (minio/helpers.py)
            raise StorageError(
                f"{uri}: {exc} (an S3 bucket name has 3-63 lower-case letters, digits, '.' or '-')"
            ) from None
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


_AUTH_HINTS = {
    "InvalidAccessKeyId": (
        "the server does not know this access key: AWS_ACCESS_KEY_ID is wrong, or belongs to another S3 server"
    ),
    "SignatureDoesNotMatch": "the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY",
    "AccessDenied": (
        "access denied: the keys are wrong (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), or valid but not allowed "
        "to do this on this bucket (check the S3 user's policy)"
    ),
    "InvalidToken": "the session token is invalid",
    "ExpiredToken": "the session token has expired",
}


def _named_s3_error(uri: str, code: str, message: str, settings: S3Settings) -> StorageError:
    where = f"{uri} on {settings.describe()}"
    if code == "NoSuchBucket":
        return S3BucketMissing(f"{where}: bucket does not exist. Create it, or fix the bucket name in the URI.")
    if code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
        return ObjectNotFound(f"{where}: no such object")
    if code in _AUTH_S3_CODES:
        return S3AuthError(
            f"{where}: the server refused the credentials ({code}); {_AUTH_HINTS.get(code, 'check the keys')} "
            f"(they come from the Kubernetes Secret '{S3_SECRET}' on a cluster)."
        )
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
