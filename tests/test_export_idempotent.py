"""Export is idempotent: a run killed anywhere is completed by a retry of the same candidate (KFP retries the step).

The crash tests run a SeaweedFS of their own (never the session's `s3_server`), kill it with SIGKILL by PID at a
chosen export stage (through `visionpipe.phases.export.stage_hook`, a test-only callback), start it again on the same
data
folder, ports and credentials, and retry. The other tests use the session server or a local folder.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from s3server import S3Server, kill_now, seaweedfs

import visionpipe.phases.export as export_module
from visionpipe.phases.export import ExportError, ExportResult, ExportStage
from visionpipe.phases.export import run as export
from visionpipe.serving import bundle as B
from visionpipe.serving import storage

Event = tuple[ExportStage, str]


class Crashable:
    """A SeaweedFS of this module's own, killed by PID and started again on the same data, ports and credentials."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._stack = ExitStack()
        self.server: S3Server = self._stack.enter_context(seaweedfs(workdir))
        self.killed = False

    def kill(self) -> None:
        kill_now(self.server)
        self.killed = True

    def restart(self) -> None:
        self._stack.close()  # the killed process is reaped already: this only closes its log
        self._stack = ExitStack()
        self.server = self._stack.enter_context(seaweedfs(self.workdir, same_as=self.server))
        self.killed = False

    def close(self) -> None:
        self._stack.close()


@pytest.fixture(scope="module")
def crashable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Crashable]:
    handle = Crashable(tmp_path_factory.mktemp("seaweedfs-crash"))
    try:
        yield handle
    finally:
        handle.close()


@pytest.fixture
def crash_bucket(crashable: Crashable, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the crashable server (started again first if an earlier test left it dead)."""
    if crashable.killed:
        crashable.restart()
    for key, value in crashable.server.env().items():
        monkeypatch.setenv(key, value)
    uri = f"s3://vp-crash-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket(uri)
    return uri


def _record(monkeypatch: pytest.MonkeyPatch, kill: Crashable | None = None, at: Event | None = None) -> list[Event]:
    """Install the stage hook: record every event; with `kill`, SIGKILL that server when the event `at` comes."""
    events: list[Event] = []

    def hook(stage: ExportStage, rel: str) -> None:
        events.append((stage, rel))
        if kill is not None and (stage, rel) == at and not kill.killed:
            kill.kill()

    monkeypatch.setattr(export_module, "stage_hook", hook)
    return events


def _local_files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _published(uri: str) -> set[str]:
    root = uri.rstrip("/") + "/"
    return {u[len(root) :] for u in storage.list_uris(uri)}


def _expected(candidate: Path, destination: str) -> ExportResult:
    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    files = manifest["files"]
    uri = storage.join(destination, manifest["name"], manifest["version"])
    return ExportResult(uri=uri, files=len(files) + 1, version=manifest["version"])


def _uploads(events: list[Event]) -> list[str]:
    return [rel for stage, rel in events if stage == "upload"]


def _assert_published(result: ExportResult, candidate: Path, tmp_path: Path) -> None:
    """The published bundle verifies, equals the candidate, and holds exactly the candidate's files."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    loaded = B.read_bundle(result.storage_uri, cache_dir=tmp_path)
    assert loaded.manifest == B.read_bundle(candidate).manifest
    assert _published(result.uri) == set(_local_files(candidate))
    for rel, data in _local_files(candidate).items():
        assert storage.read_bytes(storage.join(result.uri, rel)) == data, rel


def _assert_named_connection_error(err: pytest.ExceptionInfo[storage.S3ConnectionError], doing: str) -> None:
    message = str(err.value)
    assert "cannot reach the S3 endpoint" in message and "half uploaded" not in message
    notes = " ".join(getattr(err.value, "__notes__", []))
    assert f"stopped while {doing}" in notes and "Retrying with the same candidate resumes" in notes
    assert "AWS_SECRET" not in message


# ------------------------------------------------------------------------------------ SeaweedFS killed by PID
def test_killed_during_the_file_uploads_retry_keeps_what_was_uploaded(
    candidate: Path, crashable: Crashable, crash_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    destination = f"{crash_bucket}/bundles"
    order = sorted(set(_local_files(candidate)) - {B.BUNDLE_FILE})
    events = _record(monkeypatch, kill=crashable, at=("upload", order[1]))
    with pytest.raises(storage.S3ConnectionError) as err:
        export(candidate, destination)
    _assert_named_connection_error(err, f"uploading {order[1]}")
    assert _uploads(events) == order[:2]

    crashable.restart()
    expected = _expected(candidate, destination)
    assert _published(expected.uri) == {order[0]}  # what the killed run left: no bundle.json
    with pytest.raises(B.IncompleteBundle):
        B.read_bundle(expected.uri, cache_dir=tmp_path)
    events = _record(monkeypatch)
    result = export(candidate, destination)
    assert result == expected and result.storage_uri == expected.uri + "/"
    assert _uploads(events) == [*order[1:], B.BUNDLE_FILE]  # order[0] kept: published with the right sha256
    _assert_published(result, candidate, tmp_path)


def test_killed_after_every_file_before_bundle_json_retry_uploads_only_bundle_json(
    candidate: Path, crashable: Crashable, crash_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    destination = f"{crash_bucket}/bundles"
    events = _record(monkeypatch, kill=crashable, at=("upload", B.BUNDLE_FILE))
    with pytest.raises(storage.S3ConnectionError) as err:
        export(candidate, destination)
    _assert_named_connection_error(err, f"uploading {B.BUNDLE_FILE}")
    assert _uploads(events)[-1] == B.BUNDLE_FILE

    crashable.restart()
    expected = _expected(candidate, destination)
    assert _published(expected.uri) == set(_local_files(candidate)) - {B.BUNDLE_FILE}
    with pytest.raises(B.IncompleteBundle):  # every other file is there, yet no reader takes it for a bundle
        B.read_bundle(expected.uri, cache_dir=tmp_path)
    events = _record(monkeypatch)
    result = export(candidate, destination)
    assert result == expected
    assert events == [("upload", B.BUNDLE_FILE), ("reverify", B.BUNDLE_FILE)]
    _assert_published(result, candidate, tmp_path)


def test_killed_during_reverification_retry_verifies_and_succeeds_without_uploading(
    candidate: Path, crashable: Crashable, crash_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The reported bug: the killed run had published a complete bundle; every retry was refused as immutable."""
    destination = f"{crash_bucket}/bundles"
    _record(monkeypatch, kill=crashable, at=("reverify", B.BUNDLE_FILE))
    with pytest.raises(storage.S3ConnectionError) as err:
        export(candidate, destination)
    _assert_named_connection_error(err, "re-verifying the published bundle")

    crashable.restart()
    expected = _expected(candidate, destination)
    assert B.read_bundle(expected.storage_uri, cache_dir=tmp_path).version == expected.version  # complete already
    events = _record(monkeypatch)
    result = export(candidate, destination)
    assert result == expected and result.storage_uri == expected.uri + "/"
    assert events == []  # nothing uploaded, deleted or retracted
    _assert_published(result, candidate, tmp_path)


def test_s3_down_before_export_names_the_connection(
    candidate: Path, crashable: Crashable, crash_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashable.kill()
    events = _record(monkeypatch)
    with pytest.raises(storage.S3ConnectionError) as err:
        export(candidate, f"{crash_bucket}/bundles")
    _assert_named_connection_error(err, "listing what is already published")
    assert events == []  # (the next test using `crash_bucket` starts the server again)


# ------------------------------------------------------------------------------------ retries, on the session server
def test_retry_after_success_is_a_no_op(
    candidate: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = export(candidate, f"{s3_bucket}/bundles")
    stamps = _last_modified(first.uri)
    events = _record(monkeypatch)
    again = export(candidate, f"{s3_bucket}/bundles")
    assert again == first and again.storage_uri == first.storage_uri
    assert events == [] and _last_modified(first.uri) == stamps
    _assert_published(again, candidate, tmp_path)


def _last_modified(uri: str) -> dict[str, object]:
    from minio import Minio

    from visionpipe.serving.storage import s3_settings_from_env

    settings = s3_settings_from_env()
    client = Minio(settings.endpoint, settings.access_key, settings.secret_key, secure=settings.secure)
    bucket, key = storage.split_s3(uri)
    return {o.object_name: o.last_modified for o in client.list_objects(bucket, prefix=key + "/", recursive=True)}


def _rewrite(candidate: Path, out: Path, manifest: dict[str, object], card: dict[str, object]) -> None:
    """Write `candidate`'s weights and drift reference under another manifest / model card (same signing key)."""
    extra = {B.DRIFT_REFERENCE_FILE: candidate / B.DRIFT_REFERENCE_FILE}
    B.write_bundle(out, manifest, [candidate / "weights" / "member-0.safetensors"], card, extra)


def _other_candidate(candidate: Path, out: Path) -> Path:
    """The candidate with another model card under the same name and version (signed with the same key)."""
    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    manifest.pop("files")
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    card["description"] = "another candidate under the same version"
    _rewrite(candidate, out, manifest, card)
    return out


def test_different_candidate_under_the_same_version_is_refused(
    candidate: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    first = export(candidate, f"{s3_bucket}/bundles")
    other = _other_candidate(candidate, tmp_path / "other")
    events = _record(monkeypatch)
    with pytest.raises(ExportError) as err:
        export(other, f"{s3_bucket}/bundles")
    message = str(err.value)
    assert f"version {first.version!r}" in message and "versions are immutable" in message
    assert f"first difference: {B.MODEL_CARD_FILE}: published sha256" in message
    assert events == []  # nothing touched
    _assert_published(first, candidate, tmp_path / "check")


def test_only_manifest_fields_differ_names_bundle_json(candidate: Path, tmp_path: Path) -> None:
    first = export(candidate, str(tmp_path / "out"))
    other = tmp_path / "other"
    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    manifest.pop("files")
    manifest["created"] = "2001-01-01T00:00:00Z"
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    _rewrite(candidate, other, manifest, card)
    with pytest.raises(ExportError, match=r"first difference: bundle\.json: same files, other fields \(created\)"):
        export(other, str(tmp_path / "out"))
    assert B.read_bundle(first.uri).manifest == B.read_bundle(candidate).manifest


def test_partial_upload_with_a_wrong_and_stray_objects_is_repaired(
    candidate: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a crashed run (or an older export) may leave: a right object (kept), a wrong one (overwritten) and objects
    that are not part of the bundle (deleted before bundle.json is written)."""
    expected = _expected(candidate, f"{s3_bucket}/bundles")
    weights = "weights/member-0.safetensors"
    storage.upload_file(candidate / weights, storage.join(expected.uri, weights))
    storage.write_bytes(storage.join(expected.uri, B.MODEL_CARD_FILE), b'{"truncated": ')
    strays = ["weights/member-1.safetensors", "reports/old.md", ".tmp-upload"]
    for rel in strays:
        storage.write_bytes(storage.join(expected.uri, rel), b"left over")
    events = _record(monkeypatch)
    result = export(candidate, f"{s3_bucket}/bundles")
    assert result == expected
    assert sorted(rel for stage, rel in events if stage == "delete") == sorted(strays)
    uploads = _uploads(events)
    assert weights not in uploads and B.MODEL_CARD_FILE in uploads and uploads[-1] == B.BUNDLE_FILE
    last_delete = max(i for i, (stage, _) in enumerate(events) if stage == "delete")
    assert last_delete < events.index(("upload", B.BUNDLE_FILE))
    _assert_published(result, candidate, tmp_path)


def test_same_bundle_json_over_a_damaged_copy_is_repaired(
    candidate: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A published copy of this very candidate that lost a file or gained one: bundle.json is retracted first (no
    reader sees a complete-looking wrong bundle), the rest repaired, bundle.json written last again."""
    first = export(candidate, f"{s3_bucket}/bundles")
    storage.delete(storage.join(first.uri, B.MODEL_CARD_FILE))
    storage.write_bytes(storage.join(first.uri, "reports/stray.md"), b"not part of it")
    events = _record(monkeypatch)
    again = export(candidate, f"{s3_bucket}/bundles")
    assert again == first
    assert events == [
        ("retract", B.BUNDLE_FILE),
        ("delete", "reports/stray.md"),
        ("upload", B.MODEL_CARD_FILE),
        ("upload", B.BUNDLE_FILE),
        ("reverify", B.BUNDLE_FILE),
    ]
    _assert_published(again, candidate, tmp_path)


def test_a_sibling_version_is_never_taken_for_stray_objects(
    candidate: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """``<version>-half`` shares the S3 key prefix ``<version>``: the cleanup lists ``<version>/`` only."""
    manifest = json.loads((candidate / B.BUNDLE_FILE).read_text())
    manifest.pop("files")
    manifest["version"] += "-half"
    card = json.loads((candidate / B.MODEL_CARD_FILE).read_text())
    card["version"] = manifest["version"]
    sibling_dir = tmp_path / "sibling"
    _rewrite(candidate, sibling_dir, manifest, card)
    sibling = export(sibling_dir, f"{s3_bucket}/bundles")
    events = _record(monkeypatch)
    result = export(candidate, f"{s3_bucket}/bundles")
    assert sibling.uri == result.uri + "-half"
    assert not [rel for stage, rel in events if stage == "delete"]
    assert _published(sibling.uri) == set(_local_files(sibling_dir))
    _assert_published(result, candidate, tmp_path / "check")


# ------------------------------------------------------------------------------------ local destinations
def test_local_destination_retry_is_idempotent_and_cleans_leftovers(
    candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = _expected(candidate, str((tmp_path / "out").resolve()))
    target = Path(expected.uri)
    (target / "weights").mkdir(parents=True)
    (target / "weights" / ".tmp-abc").write_bytes(b"half a file")  # a killed atomic write
    (target / B.MODEL_CARD_FILE).write_bytes(b"wrong")
    events = _record(monkeypatch)
    result = export(candidate, str(tmp_path / "out"))
    assert result == expected
    assert [rel for stage, rel in events if stage == "delete"] == ["weights/.tmp-abc"]
    assert _local_files(target) == _local_files(candidate)
    events.clear()
    assert export(candidate, str(tmp_path / "out")) == expected and events == []


def test_threshold_at_half_retry_is_idempotent(
    half_candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The threshold_at_half bundle is built once, by bundle_validation; a retried export finds it published."""
    first = export(half_candidate, str(tmp_path / "out"))
    assert first.version.endswith("-half")
    events = _record(monkeypatch)
    assert export(half_candidate, str(tmp_path / "out")) == first
    assert events == []
