"""Bundle signatures: Ed25519 over the canonical bytes of `bundle.json`.

`bundle.json` holds the sha256 of every other file of the bundle, so one signature over it covers the whole
bundle: the class names, thresholds, calibrator, version and, through the digests, the weights and model card.

Why Ed25519 from `cryptography` and not OpenSSF model-signing (sigstore): no new dependency (`cryptography` is
already locked), it works offline (no Fulcio / Rekor round trip at training or serving time), and a key is 32
bytes, which fits a Kubernetes Secret or a single environment variable.

The signature file, ``bundle.sig``, is a small JSON object written BEFORE `bundle.json` (which stays the last
file written: its presence means the bundle is complete)::

    {"format": 1, "algorithm": "ed25519", "key_id": "<sha256 hex of the raw 32-byte public key>",
     "manifest_sha256": "<sha256 hex of the canonical manifest bytes>", "signature": "<base64, 64 bytes>"}

The signed message is ``DOMAIN + canonical_bytes(manifest)``: the parsed manifest re-serialised with sorted keys,
no whitespace and ASCII escapes, so the signature does not depend on how the JSON was indented.

Keys (never in code, never logged; only key ids are printed):

- signing: `VISIONPIPE_SIGNING_KEY` (base64 of the raw 32-byte private key, or a PEM PKCS#8 private key; on a
  cluster set from a Kubernetes Secret), else a local key generated on first use at
  ``<config>/signing-key.pem`` (mode 0600; ``<config>`` is `$VISIONPIPE_CONFIG_DIR`, else
  `$XDG_CONFIG_HOME/visionpipe`, else ``~/.config/visionpipe``), its public half beside it in
  ``signing-key.pub`` (base64) to hand to the verifiers;
- trusted for verification: `VISIONPIPE_TRUSTED_KEYS` (comma-separated base64 public keys, or the path of a file
  with one base64 public key per line, ``#`` comments allowed; on KServe set from a Secret / ConfigMap), plus the
  public half of `VISIONPIPE_SIGNING_KEY` and of the local key when they exist. Several keys may be trusted at
  once (key rotation).

``python -m visionpipe.serving.signing keygen --out FILE`` writes a fresh private key (base64, mode 0600) for a Secret
and
prints its public key and key id; ``python -m visionpipe.serving.signing public`` prints the current signing key's.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"
SIGNATURE_FORMAT = 1
SIGNATURE_FILE = "bundle.sig"
DOMAIN = b"visionpipe-bundle-signature-v1\x00"

SIGNING_KEY_ENV = "VISIONPIPE_SIGNING_KEY"
TRUSTED_KEYS_ENV = "VISIONPIPE_TRUSTED_KEYS"
CONFIG_DIR_ENV = "VISIONPIPE_CONFIG_DIR"
LOCAL_KEY_FILE = "signing-key.pem"
LOCAL_PUBLIC_FILE = "signing-key.pub"

_RAW_KEY_BYTES = 32
_SIGNATURE_BYTES = 64


class SignatureError(ValueError):
    """A signature does not verify; `reason` is ``unsigned``, ``bad_signature`` or ``untrusted_key``."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class KeyConfigError(ValueError):
    """A signing or trusted key is missing, malformed or unsafely stored (the message never holds key material)."""


@dataclass(frozen=True)
class SignatureFile:
    """The parsed contents of ``bundle.sig``."""

    key_id: str
    manifest_sha256: str
    signature: bytes
    algorithm: str = ALGORITHM

    def to_bytes(self) -> bytes:
        payload = {
            "format": SIGNATURE_FORMAT,
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "manifest_sha256": self.manifest_sha256,
            "signature": base64.b64encode(self.signature).decode("ascii"),
        }
        return (json.dumps(payload, sort_keys=True, indent=1) + "\n").encode("ascii")


# ------------------------------------------------------------------------------------------ sign / verify


def canonical_bytes(manifest: Mapping[str, object]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, ASCII only (non-ASCII as \\u escapes)."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def key_id(public: Ed25519PublicKey) -> str:
    """sha256 (hex) of the raw 32-byte public key."""
    return hashlib.sha256(raw_public_bytes(public)).hexdigest()


def raw_public_bytes(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def public_key_b64(public: Ed25519PublicKey) -> str:
    """The form `VISIONPIPE_TRUSTED_KEYS` takes: base64 of the raw 32-byte public key."""
    return base64.b64encode(raw_public_bytes(public)).decode("ascii")


def sign_manifest(manifest: Mapping[str, object], private: Ed25519PrivateKey) -> SignatureFile:
    message = canonical_bytes(manifest)
    return SignatureFile(
        key_id=key_id(private.public_key()),
        manifest_sha256=hashlib.sha256(message).hexdigest(),
        signature=private.sign(DOMAIN + message),
    )


def parse_signature_file(data: bytes) -> SignatureFile:
    """Parse ``bundle.sig``; anything malformed is a ``bad_signature``."""
    try:
        payload = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise SignatureError(f"{SIGNATURE_FILE} is not valid JSON ({exc})", "bad_signature") from exc
    if not isinstance(payload, dict):
        raise SignatureError(f"{SIGNATURE_FILE} must hold a JSON object", "bad_signature")
    if payload.get("format") != SIGNATURE_FORMAT or payload.get("algorithm") != ALGORITHM:
        raise SignatureError(
            f"{SIGNATURE_FILE}: format {payload.get('format')!r} / algorithm {payload.get('algorithm')!r} is not "
            f"supported (expected format {SIGNATURE_FORMAT}, {ALGORITHM})",
            "bad_signature",
        )
    kid, digest, sig = payload.get("key_id"), payload.get("manifest_sha256"), payload.get("signature")
    if not (isinstance(kid, str) and _is_hex(kid, 64) and isinstance(digest, str) and _is_hex(digest, 64)):
        raise SignatureError(f"{SIGNATURE_FILE}: key_id and manifest_sha256 must be sha256 hex", "bad_signature")
    try:
        signature = base64.b64decode(str(sig), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{SIGNATURE_FILE}: signature is not base64", "bad_signature") from exc
    if len(signature) != _SIGNATURE_BYTES:
        raise SignatureError(f"{SIGNATURE_FILE}: an Ed25519 signature has {_SIGNATURE_BYTES} bytes", "bad_signature")
    return SignatureFile(key_id=kid, manifest_sha256=digest, signature=signature)


def verify_manifest(
    manifest: Mapping[str, object], signature: SignatureFile, trusted: Mapping[str, Ed25519PublicKey]
) -> str:
    """The key id that signed `manifest`; raises `SignatureError` (``untrusted_key`` / ``bad_signature``)."""
    public = trusted.get(signature.key_id)
    if public is None:
        raise SignatureError(
            f"signed by key {signature.key_id[:16]}…, which is not trusted here (trusted: "
            f"{', '.join(k[:16] + '…' for k in sorted(trusted)) or 'none'}); add its public key to "
            f"{TRUSTED_KEYS_ENV}",
            "untrusted_key",
        )
    message = canonical_bytes(manifest)
    if hashlib.sha256(message).hexdigest() != signature.manifest_sha256:
        raise SignatureError(
            f"bundle.json changed after it was signed by key {signature.key_id[:16]}…", "bad_signature"
        )
    try:
        public.verify(signature.signature, DOMAIN + message)
    except InvalidSignature as exc:
        raise SignatureError(
            f"the signature in {SIGNATURE_FILE} does not verify with key {signature.key_id[:16]}…", "bad_signature"
        ) from exc
    return signature.key_id


# ------------------------------------------------------------------------------------------------- keys


def config_dir(environ: Mapping[str, str] | None = None) -> Path:
    """`$VISIONPIPE_CONFIG_DIR`, else `$XDG_CONFIG_HOME/visionpipe`, else ``~/.config/visionpipe``."""
    env = os.environ if environ is None else environ
    if env.get(CONFIG_DIR_ENV):
        return Path(env[CONFIG_DIR_ENV]).expanduser()
    if env.get("XDG_CONFIG_HOME"):
        return Path(env["XDG_CONFIG_HOME"]).expanduser() / "visionpipe"
    return Path.home() / ".config" / "visionpipe"


def load_private_key(text: str, where: str) -> Ed25519PrivateKey:
    """A private key from base64 of the raw 32 bytes, or from PEM (PKCS#8). `where` names the source."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        try:
            key = serialization.load_pem_private_key(text.encode("ascii"), password=None)
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise KeyConfigError(f"{where}: not a readable unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyConfigError(f"{where}: the PEM key is not an Ed25519 key")
        return key
    raw = _b64_key(text, where, "private")
    return Ed25519PrivateKey.from_private_bytes(raw)


def load_public_key(text: str, where: str) -> Ed25519PublicKey:
    """A public key from base64 of the raw 32 bytes."""
    return Ed25519PublicKey.from_public_bytes(_b64_key(text.strip(), where, "public"))


def signing_key_from_env(environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey | None:
    env = os.environ if environ is None else environ
    value = env.get(SIGNING_KEY_ENV, "")
    return load_private_key(value, SIGNING_KEY_ENV) if value.strip() else None


def local_key_path(environ: Mapping[str, str] | None = None) -> Path:
    return config_dir(environ) / LOCAL_KEY_FILE


def local_signing_key(create: bool = True, environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey | None:
    """The local key (generated on first use when `create`); None when absent and not created."""
    path = local_key_path(environ)
    if not path.exists() and not path.is_symlink():
        if not create:
            return None
        try:
            _create_local_key(path)
        except OSError as exc:
            raise KeyConfigError(
                f"cannot create the local signing key {path} ({type(exc).__name__}: {exc.strerror}); set "
                f"{SIGNING_KEY_ENV} (on a cluster from a Kubernetes Secret) or {CONFIG_DIR_ENV} to a writable folder"
            ) from exc
    return _read_local_key(path)


def default_signing_key(environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey:
    """`VISIONPIPE_SIGNING_KEY` when set, else the local key (generated on first use): always a key."""
    return signing_key_from_env(environ) or _local_key_or_fail(environ)


def trusted_keys(environ: Mapping[str, str] | None = None) -> dict[str, Ed25519PublicKey]:
    """key id -> public key: `VISIONPIPE_TRUSTED_KEYS`, the env signing key's and the local key's public halves."""
    env = os.environ if environ is None else environ
    keys: list[Ed25519PublicKey] = []
    value = env.get(TRUSTED_KEYS_ENV, "").strip()
    if value:
        keys.extend(_trusted_from_setting(value))
    own = signing_key_from_env(env)
    if own is not None:
        keys.append(own.public_key())
    local = local_signing_key(create=False, environ=env)
    if local is not None:
        keys.append(local.public_key())
    return {key_id(k): k for k in keys}


def _local_key_or_fail(environ: Mapping[str, str] | None) -> Ed25519PrivateKey:
    key = local_signing_key(create=True, environ=environ)
    if key is None:  # pragma: no cover - create=True always yields a key or raises
        raise KeyConfigError("no signing key")
    return key


def _trusted_from_setting(value: str) -> list[Ed25519PublicKey]:
    path = Path(value).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise KeyConfigError(f"{TRUSTED_KEYS_ENV}: cannot read {path} ({type(exc).__name__})") from exc
        items = [(f"{path}:{n}", line.split("#", 1)[0].strip()) for n, line in enumerate(text.splitlines(), 1)]
        keys = [load_public_key(item, where) for where, item in items if item]
        if not keys:
            raise KeyConfigError(f"{TRUSTED_KEYS_ENV}: {path} lists no public key")
        return keys
    if value.startswith(("/", "./", "~")) and not _looks_like_key(value.split(",", 1)[0]):
        raise KeyConfigError(f"{TRUSTED_KEYS_ENV}: {value} is not a file")
    return [
        load_public_key(item, f"{TRUSTED_KEYS_ENV}[{i}]") for i, item in enumerate(value.split(",")) if item.strip()
    ]


def _looks_like_key(item: str) -> bool:
    try:
        return len(base64.b64decode(item.strip(), validate=True)) == _RAW_KEY_BYTES
    except (binascii.Error, ValueError):
        return False


def _b64_key(text: str, where: str, kind: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise KeyConfigError(f"{where}: not base64 (expected the raw 32-byte Ed25519 {kind} key in base64)") from exc
    if len(raw) != _RAW_KEY_BYTES:
        raise KeyConfigError(f"{where}: an Ed25519 {kind} key has {_RAW_KEY_BYTES} bytes, this one {len(raw)}")
    return raw


def _create_local_key(path: Path) -> None:
    """Generate the local key atomically: a 0600 temp file hard-linked into place (the first writer wins)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".signing-key-")  # mkstemp creates the file 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return  # another process generated it first: use that one
        except OSError:  # a filesystem without hard links
            try:
                out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return
            with os.fdopen(out, "wb") as f:
                f.write(pem)
    finally:
        os.unlink(tmp)
    public = key.public_key()
    with contextlib.suppress(OSError):  # a convenience copy only; the private key holds the public half
        (path.parent / LOCAL_PUBLIC_FILE).write_text(public_key_b64(public) + "\n")
    print(
        f"visionpipe: generated a local bundle-signing key {path} (key id {key_id(public)[:16]}…); "
        f"verifiers elsewhere need its public key ({path.parent / LOCAL_PUBLIC_FILE}) in {TRUSTED_KEYS_ENV}",
        file=sys.stderr,
    )


def _read_local_key(path: Path) -> Ed25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise KeyConfigError(f"local signing key {path}: cannot open ({type(exc).__name__}; no symlinks)") from exc
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise KeyConfigError(f"local signing key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise KeyConfigError(
                f"local signing key {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                "run chmod 600 on it"
            )
        if hasattr(os, "getuid") and info.st_uid != os.getuid():
            raise KeyConfigError(f"local signing key {path} belongs to another user")
        data = f.read(16 * 1024)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise KeyConfigError(f"local signing key {path} is not a PEM or base64 key") from exc
    return load_private_key(text, f"local signing key {path}")


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


# -------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m visionpipe.serving.signing", description="visionpipe bundle-signing keys"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("keygen", help="write a new private key (base64, mode 0600) for a Kubernetes Secret")
    gen.add_argument("--out", type=Path, required=True, help="file to create (refused when it exists)")
    sub.add_parser("public", help=f"print the public key of {SIGNING_KEY_ENV} (else the local key)")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            key = Ed25519PrivateKey.generate()
            raw = key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(raw).decode("ascii") + "\n")
        else:
            key = default_signing_key()
    except (KeyConfigError, OSError) as exc:
        print(f"python -m visionpipe.serving.signing: {exc}", file=sys.stderr)
        return 1
    public = key.public_key()
    print(f"public key (for {TRUSTED_KEYS_ENV}): {public_key_b64(public)}\nkey id: {key_id(public)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
