"""Bundle signatures (visionpipe/serving/signing.py): tampering, unsigned and untrusted bundles, key rotation, local
keys."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from bundle_copies import Manifest, copy_bundle, read_manifest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from visionpipe.cli import main
from visionpipe.serving import bundle as B
from visionpipe.serving import signing


def _write_manifest(root: Path, manifest: Manifest, key: Ed25519PrivateKey | None) -> None:
    """Write bundle.json (checksums as they are: every listed file is untouched); sign it when `key` is given."""
    if key is not None:
        (root / B.SIGNATURE_FILE).write_bytes(signing.sign_manifest(manifest, key).to_bytes())
    (root / B.BUNDLE_FILE).write_text(json.dumps(manifest, indent=1))


def _section(manifest: Manifest, *path: str) -> dict[str, object]:
    obj: object = manifest
    for key in path:
        assert isinstance(obj, dict)
        obj = obj[key]
    assert isinstance(obj, dict)
    return obj


def _swap_labels(m: Manifest) -> None:
    task = _section(m, "task")
    classes = task["classes"]
    assert isinstance(classes, list)
    task["classes"] = classes[::-1]


def _threshold(m: Manifest) -> None:
    _section(m, "policy", "policies", "threshold")["threshold"] = 0.999999


def _temperature(m: Manifest) -> None:
    _section(m, "calibrator")["temperature"] = 1000.0


def _version(m: Manifest) -> None:
    m["version"] = "99990101-000000-renamed"


def _local_key() -> Ed25519PrivateKey:
    return signing.default_signing_key()


def _b64(key: Ed25519PrivateKey) -> str:
    return signing.public_key_b64(key.public_key())


def test_candidate_is_signed_by_the_local_key(candidate: Path, visionpipe_config_dir: Path) -> None:
    bundle = B.read_bundle(candidate)
    assert bundle.signature_status == "verified"
    assert bundle.signed_by == signing.key_id(_local_key().public_key())
    assert (visionpipe_config_dir / signing.LOCAL_KEY_FILE).is_file()  # the session's key, not ~/.config
    sig = json.loads((candidate / B.SIGNATURE_FILE).read_text())
    assert sig["algorithm"] == "ed25519" and sig["key_id"] == bundle.signed_by
    assert len(base64.b64decode(sig["signature"])) == 64


@pytest.mark.parametrize(
    ("edit", "field", "changed"),
    [
        (_swap_labels, ("task", "classes"), [str(d) for d in range(9, -1, -1)]),
        (_threshold, ("policy", "policies", "threshold", "threshold"), 0.999999),
        (_temperature, ("calibrator", "temperature"), 1000.0),
        (_version, ("version",), "99990101-000000-renamed"),
    ],
)
def test_tampered_manifest_is_refused_until_resigned(
    candidate: Path,
    tmp_path: Path,
    edit: Callable[[Manifest], None],
    field: tuple[str, ...],
    changed: object,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = copy_bundle(candidate, tmp_path)
    manifest = read_manifest(root)
    edit(manifest)
    _write_manifest(root, manifest, key=None)  # checksums still match: only the signature can tell
    with pytest.raises(B.BadSignature, match="changed after it was signed") as err:
        B.read_bundle(root)
    assert err.value.reason == "bad_signature"
    with pytest.raises(B.BadSignature):
        B.read_bundle(root, allow_unsigned=True)  # proof of tampering is refused even with the opt-out
    assert main(["validate-bundle", str(root)]) == 1
    captured = capsys.readouterr()
    assert "REFUSED [bad_signature]" in captured.out and "bad_signature: " in captured.err
    # the same edit signed by a trusted key is accepted: the signature is what refused it
    _write_manifest(root, manifest, key=_local_key())
    value: object = B.read_bundle(root).manifest
    for key in field:
        assert isinstance(value, dict)
        value = value[key]
    assert value == changed


def test_unsigned_bundle_refused_unless_explicitly_allowed(
    candidate: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = copy_bundle(candidate, tmp_path)
    (root / B.SIGNATURE_FILE).unlink()
    with pytest.raises(B.Unsigned, match="not signed") as err:
        B.read_bundle(root)
    assert err.value.reason == "unsigned"
    bundle = B.read_bundle(root, allow_unsigned=True)
    assert bundle.signature_status == "unsigned" and bundle.signed_by is None
    assert main(["validate-bundle", str(root)]) == 1
    assert "REFUSED [unsigned]" in capsys.readouterr().out
    assert main(["validate-bundle", "--allow-unsigned", str(root)]) == 0
    assert "signature: NOT VERIFIED (unsigned" in capsys.readouterr().out


def test_write_bundle_sign_false_writes_no_signature(candidate: Path, tmp_path: Path) -> None:
    manifest = {k: v for k, v in read_manifest(candidate).items() if k != "files"}
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    out = tmp_path / "unsigned"
    B.write_bundle(out, manifest, [candidate / "weights" / "member-0.safetensors"], card, sign=False)
    assert not (out / B.SIGNATURE_FILE).exists()
    with pytest.raises(B.Unsigned):
        B.read_bundle(out)
    B.write_bundle(out, manifest, [candidate / "weights" / "member-0.safetensors"], card)  # default: signed
    assert B.read_bundle(out).signature_status == "verified"


def test_write_bundle_writes_the_signature_before_the_manifest(
    candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    order: list[str] = []
    real = B._write_bytes

    def record(path: Path, payload: bytes) -> None:
        order.append(path.name)
        real(path, payload)

    monkeypatch.setattr(B, "_write_bytes", record)
    manifest = {k: v for k, v in read_manifest(candidate).items() if k != "files"}
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    B.write_bundle(tmp_path / "b", manifest, [candidate / "weights" / "member-0.safetensors"], card)
    assert order[-2:] == [B.SIGNATURE_FILE, B.BUNDLE_FILE]


def test_untrusted_key_refused_then_trusted_via_env(
    candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_bundle(candidate, tmp_path)
    stranger = Ed25519PrivateKey.generate()
    _write_manifest(root, read_manifest(root), key=stranger)
    with pytest.raises(B.UntrustedKey, match="not trusted here") as err:
        B.read_bundle(root)
    assert err.value.reason == "untrusted_key"
    lax = B.read_bundle(root, allow_unsigned=True)
    assert lax.signature_status == "untrusted_key" and lax.signed_by == signing.key_id(stranger.public_key())
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, _b64(stranger))
    assert B.read_bundle(root).signature_status == "verified"


def test_forged_key_id_is_a_bad_signature(candidate: Path, tmp_path: Path) -> None:
    """Naming a trusted key id does not help a signature made with another key."""
    root = copy_bundle(candidate, tmp_path)
    manifest = read_manifest(root)
    _temperature(manifest)
    forged = signing.sign_manifest(manifest, Ed25519PrivateKey.generate())
    trusted_id = signing.key_id(_local_key().public_key())
    (root / B.SIGNATURE_FILE).write_bytes(
        signing.SignatureFile(trusted_id, forged.manifest_sha256, forged.signature).to_bytes()
    )
    _write_manifest(root, manifest, key=None)
    with pytest.raises(B.BadSignature, match="does not verify"):
        B.read_bundle(root)


@pytest.mark.parametrize(
    "content",
    [b"not json", b'{"format": 1, "algorithm": "rsa"}', b"[]", b"\xff\xfe", b'{"format": 1}' + b" " * 20000],
)
def test_malformed_signature_file_is_a_bad_signature(candidate: Path, tmp_path: Path, content: bytes) -> None:
    root = copy_bundle(candidate, tmp_path)
    (root / B.SIGNATURE_FILE).write_bytes(content)
    with pytest.raises(B.BadSignature) as err:
        B.read_bundle(root, allow_unsigned=True)
    assert err.value.reason == "bad_signature"


def test_key_rotation_trusts_several_keys(candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    by_old, by_new = copy_bundle(candidate, tmp_path / "a"), copy_bundle(candidate, tmp_path / "b")
    _write_manifest(by_old, read_manifest(by_old), key=old)
    _write_manifest(by_new, read_manifest(by_new), key=new)
    # during the rotation both are trusted, as a comma-separated list ...
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, f"{_b64(old)}, {_b64(new)}")
    assert B.read_bundle(by_old).signed_by == signing.key_id(old.public_key())
    assert B.read_bundle(by_new).signed_by == signing.key_id(new.public_key())
    # ... or as a file with one key per line (a mounted Secret / ConfigMap)
    keys_file = tmp_path / "trusted-keys"
    keys_file.write_text(f"# visionpipe trusted keys\n{_b64(old)}  # retiring\n\n{_b64(new)}\n")
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, str(keys_file))
    assert B.read_bundle(by_old).signature_status == B.read_bundle(by_new).signature_status == "verified"
    # old bundles re-signed with the new key survive dropping the old key
    B.reseal_bundle(by_old, signing_key=new)
    keys_file.write_text(f"{_b64(new)}\n")
    assert B.read_bundle(by_old).signed_by == signing.key_id(new.public_key())
    _write_manifest(by_new, read_manifest(by_new), key=old)
    with pytest.raises(B.UntrustedKey):
        B.read_bundle(by_new)


def test_reseal_lists_a_report_and_refuses_a_tampered_bundle(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    (root / "notes.md").write_text("written after validation\n")
    with pytest.raises(B.UnlistedFile):
        B.read_bundle(root)
    B.reseal_bundle(root, add=["notes.md"])
    files = B.read_bundle(root).manifest["files"]
    assert isinstance(files, dict) and "notes.md" in files
    manifest = read_manifest(root)
    _threshold(manifest)
    _write_manifest(root, manifest, key=None)
    with pytest.raises(B.BadSignature):
        B.reseal_bundle(root)  # never launders a tampered bundle


def test_env_signing_key_signs_and_is_trusted(candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    manifest = {k: v for k, v in read_manifest(candidate).items() if k != "files"}
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    for i, value in enumerate((base64.b64encode(raw).decode(), pem.decode())):
        monkeypatch.setenv(signing.SIGNING_KEY_ENV, value)
        out = tmp_path / f"b{i}"
        B.write_bundle(out, manifest, [candidate / "weights" / "member-0.safetensors"], card)
        assert B.read_bundle(out).signed_by == signing.key_id(key.public_key())


@pytest.mark.parametrize("value", ["c2VjcmV0LXRoYXQtaXMtbm90LWEta2V5", "-----BEGIN PRIVATE KEY-----\nxx\n", "%%%"])
def test_malformed_signing_key_is_refused_without_echoing_it(
    candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(signing.SIGNING_KEY_ENV, value)
    manifest = {k: v for k, v in read_manifest(candidate).items() if k != "files"}
    with pytest.raises(B.KeyConfig) as err:
        B.write_bundle(tmp_path / "b", manifest, [candidate / "weights" / "member-0.safetensors"], {})
    assert err.value.reason == "key_config" and signing.SIGNING_KEY_ENV in str(err.value)
    assert value.strip() not in str(err.value)
    assert not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.parametrize("value", ["not-base64!", "AAAA", "/no/such/trusted-keys"])
def test_malformed_trusted_keys_fail_closed(candidate: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv(signing.TRUSTED_KEYS_ENV, value)
    with pytest.raises(B.KeyConfig) as err:
        B.read_bundle(candidate)
    assert err.value.reason == "key_config"


def test_local_key_generated_once_private_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "config"
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(folder))
    first = signing.default_signing_key()
    path = folder / signing.LOCAL_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (folder / signing.LOCAL_PUBLIC_FILE).read_text().strip() == _b64(first)
    assert signing.key_id(signing.default_signing_key().public_key()) == signing.key_id(first.public_key())
    assert signing.key_id(first.public_key()) in signing.trusted_keys()
    path.chmod(0o644)
    with pytest.raises(signing.KeyConfigError, match="chmod 600"):
        signing.default_signing_key()


def test_config_dir_precedence(tmp_path: Path) -> None:
    assert signing.config_dir({"VISIONPIPE_CONFIG_DIR": "/a", "XDG_CONFIG_HOME": "/b"}) == Path("/a")
    assert signing.config_dir({"XDG_CONFIG_HOME": "/b"}) == Path("/b/visionpipe")
    assert signing.config_dir({}) == Path.home() / ".config" / "visionpipe"


def test_verifying_never_creates_a_local_key(candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "empty-config"
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(folder))
    with pytest.raises(B.UntrustedKey, match="trusted: none"):
        B.read_bundle(candidate)  # a serving pod trusts only what it is given
    assert not folder.exists()


def test_keygen_cli_writes_a_private_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "signing-key"
    assert signing.main(["keygen", "--out", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    key = signing.load_private_key(out.read_text(), "test")
    printed = capsys.readouterr().out
    assert _b64(key) in printed and signing.key_id(key.public_key()) in printed
    assert out.read_text().strip() not in printed  # the private key is written, never printed
    assert signing.main(["keygen", "--out", str(out)]) == 1  # never overwrites a key


def test_unwritable_config_dir_names_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(signing.CONFIG_DIR_ENV, str(blocker / "visionpipe"))  # a folder below a file
    with pytest.raises(signing.KeyConfigError, match=f"set {signing.SIGNING_KEY_ENV}"):
        signing.default_signing_key()


def test_serve_refuses_an_unsigned_bundle_by_name_unless_allowed(candidate: Path, tmp_path: Path) -> None:
    """`python -m visionpipe.serving.server` (the ServingRuntime's command) refuses with the reason, no traceback; with
    --allow-unsigned the same bundle loads and the server answers ready."""
    import subprocess
    import sys

    from visionpipe.harness import free_port, running_server

    root = copy_bundle(candidate, tmp_path)
    (root / B.SIGNATURE_FILE).unlink()
    refused = subprocess.run(
        [sys.executable, "-m", "visionpipe.serving.server", "--model_dir", str(root), "--http_port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0
    assert "refusing bundle: unsigned:" in refused.stderr and "Traceback" not in refused.stderr
    port = free_port()
    argv = [sys.executable, "-m", "visionpipe.serving.server", "--model_dir", str(root), "--http_port", str(port)]
    with running_server([*argv, "--allow-unsigned"], port, ready_path="/v2/models/visionpipe/ready", timeout_s=120):
        pass  # running_server waited until the model answered ready
