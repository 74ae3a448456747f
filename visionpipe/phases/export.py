"""Phase 7, export: publish a validated bundle to a local folder or ``s3://bucket/prefix`` (MinIO).

The bundle lands at ``<destination>/<name>/<version>/`` — a layout usable directly as a KServe
``storageUri`` (`ExportResult.storage_uri`: with a trailing ``/`` for s3://, see there). Every file of the bundle
folder but `bundle.json` (weights, model card, `bundle.sig`, reports: each file alike) is uploaded first and its
sha256 checked after upload (read back from the store); `bundle.json` goes last, so a reader never sees half a
bundle; finally the published bundle is re-verified through `visionpipe.serving.bundle.read_bundle` and compared file
for file
with the local folder (a copy that does not verify loses its `bundle.json` again: `ExportError`).

A published version is immutable, yet export is idempotent (KFP retries the step; a run may be killed anywhere):

- `bundle.json` published with the same bytes as the local one (the same signed manifest, hence the same `files`
  digests): a retry of the same candidate. The published copy is verified and compared with the local folder; when
  it matches nothing is uploaded and the same `ExportResult` is returned. When it does not (a file missing, changed
  or extra), its `bundle.json` is removed first and the folder repaired as below.
- `bundle.json` published with other bytes: `ExportError` naming the version and the first differing file
  (``overwrite=True`` replaces it instead: `bundle.json` removed first, then as below).
- no `bundle.json` (a fresh target, or what a killed run left): objects that are not part of this bundle are
  deleted, objects already there with the right sha256 are kept, the others uploaded (overwritten) and read back;
  `bundle.json` last.

A storage failure (the S3 server down, wrong credentials, ...) propagates as the storage layer's named error
(`visionpipe.serving.storage.S3ConnectionError`, ...) with a note naming the export step it interrupted.

Fail closed before any work: an s3:// destination without S3 settings raises `S3CredentialsMissing` (naming the
Secret and the missing keys), and inside a Kubeflow pod a destination that is not s3:// raises
`LocalDestinationOnCluster` (the pod's disk is deleted with the pod; see `visionpipe.phases.pod.in_kfp_pod`).
"""

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from visionpipe.phases.pod import refuse_local_destination_in_pod, require_s3_credentials
from visionpipe.serving import storage
from visionpipe.serving.bundle import BUNDLE_FILE, BundleError, IncompleteBundle, read_bundle, sha256_file


class ExportError(RuntimeError):
    """Publishing failed, or was refused; nothing new readable was left behind (no new bundle.json at the target)."""


ExportStage = Literal["retract", "delete", "upload", "reverify"]
StageHook = Callable[[ExportStage, str], None]

stage_hook: StageHook | None = None
"""Tests only, never set in production: called with (stage, path relative to the bundle folder) just before each
step that changes the store — ``retract`` (the published bundle.json removed before a repair or an overwrite),
``delete`` (an object that is not part of the bundle), ``upload`` (one file; bundle.json last) — and before the
final re-verification (``reverify``, bundle.json). tests/test_export_idempotent.py sets it to count uploads and to
kill the S3 server at a chosen stage."""


@dataclass(frozen=True)
class ExportResult:
    uri: str
    files: int
    version: str

    @property
    def storage_uri(self) -> str:
        """The URI to put in an InferenceService's ``storageUri``: for s3:// the folder with a trailing ``/``.

        KServe's storage initializer lists ``bucket.objects.filter(Prefix=<path of the URI>)`` and keeps each key's
        remainder after that prefix (kserve_storage/kserve_storage.py, `Storage._download_s3`). Without the slash,
        ``.../<version>`` also matches a sibling version whose name starts with this one (``<version>-half`` from
        threshold_at_half) and its files would be downloaded too, under ``-half/``; with it, exactly this bundle."""
        return self.uri.rstrip("/") + "/" if storage.is_s3(self.uri) else self.uri


def run(bundle_dir: Path, destination: str, overwrite: bool = False) -> ExportResult:
    """Publish the bundle in `bundle_dir` below `destination`, exactly as it is; returns the published URI.

    Idempotent for the same candidate (see the module docstring); a different candidate under a published version
    is refused unless `overwrite`. Export changes nothing in the bundle: a threshold_at_half bundle (a binary
    bundle with a positive class, remapped so its threshold sits at 0.5) is assembled, checked and signed by
    bundle_validation and published here byte for byte."""
    refuse_local_destination_in_pod(destination)
    require_s3_credentials(destination)
    manifest = read_bundle(bundle_dir).manifest  # refuse to publish anything that does not verify
    name, version = str(manifest["name"]), str(manifest["version"])
    if not storage.is_s3(destination):
        destination = str(Path(destination).resolve())
    target = storage.join(destination, name, version)
    files = manifest["files"]
    assert isinstance(files, dict)
    publication = _Publication(bundle_dir, target, _digests(bundle_dir))
    try:
        publication.publish(name, version, files, overwrite)
    except storage.StorageError as exc:
        exc.add_note(publication.interrupted())
        raise
    return ExportResult(uri=target, files=len(files) + 1, version=version)


@dataclass
class _Publication:
    """One export of `bundle_dir` to `target`; `doing` names the current step (for a storage failure's note)."""

    bundle_dir: Path
    target: str
    local: dict[str, str]  # relative path -> sha256 of every file in the bundle folder, bundle.json included
    doing: str = "starting"

    def uri(self, rel: str) -> str:
        return storage.join(self.target, rel)

    def publish(self, name: str, version: str, files: dict[object, object], overwrite: bool) -> None:
        self.doing = "listing what is already published"
        published = self.published()
        if BUNDLE_FILE in published:
            self.doing = f"reading the published {BUNDLE_FILE}"
            theirs = storage.read_bytes(self.uri(BUNDLE_FILE))
            same = _sha256(theirs) == self.local[BUNDLE_FILE]
            if not same and not overwrite:
                raise ExportError(self.conflict(name, version, files, theirs))
            if same:
                self.doing = "verifying the published copy of this candidate"
                problem = self.check_published()
                if problem is None:
                    print(f"export: {self.target} already holds this candidate (same {BUNDLE_FILE}); verified, kept")
                    return
                print(f"export: {self.target} holds this candidate's {BUNDLE_FILE} but {problem}; republishing")
            else:
                print(f"export: {self.target} holds another bundle; overwriting it (overwrite=True)")
            self.doing = f"removing the published {BUNDLE_FILE} before republishing"
            _stage("retract", BUNDLE_FILE)
            storage.delete(self.uri(BUNDLE_FILE))  # from here on, readers see an incomplete bundle, never a mixed one
            del published[BUNDLE_FILE]
        self.upload(published)
        self.doing = f"re-verifying the published bundle ({BUNDLE_FILE} is written)"
        _stage("reverify", BUNDLE_FILE)
        problem = self.check_published()
        if problem is not None:
            self.doing = f"removing the {BUNDLE_FILE} of a published bundle that does not verify"
            storage.delete(self.uri(BUNDLE_FILE))
            raise ExportError(
                f"{self.target}: the published bundle {problem}; its {BUNDLE_FILE} was removed again, so nothing "
                "readable is left"
            )
        print(f"export: published {self.target}")

    def published(self) -> dict[str, str]:
        """relative path -> URI of every object already below the target (none for a missing local folder)."""
        try:
            uris = storage.list_uris(self.target)
        except storage.ObjectNotFound:
            return {}
        root = self.target.rstrip("/") + "/"
        return {uri[len(root) :]: uri for uri in uris if uri.startswith(root)}

    def upload(self, published: dict[str, str]) -> None:
        """Delete strays, keep objects with the right sha256, upload (overwrite) the others; bundle.json last."""
        for rel in sorted(set(published) - set(self.local)):
            self.doing = f"deleting {rel}, which is not part of this bundle"
            _stage("delete", rel)
            storage.delete(published[rel])
            print(f"export: {published[rel]} removed (not part of this bundle)")
        for rel in [*sorted(set(self.local) - {BUNDLE_FILE}), BUNDLE_FILE]:
            uri = self.uri(rel)
            if rel in published:
                self.doing = f"checking the already published {rel}"
                if storage.sha256_of(uri) == self.local[rel]:
                    print(f"export: {uri} already published (sha256 verified), kept")
                    continue
            self.doing = f"uploading {rel}" + (" (every other file is published)" if rel == BUNDLE_FILE else "")
            _stage("upload", rel)
            storage.upload_file(self.bundle_dir / rel, uri)
            self.doing = f"reading back {rel}"
            actual = storage.sha256_of(uri)
            if actual != self.local[rel]:
                if rel == BUNDLE_FILE:
                    storage.delete(uri)
                raise ExportError(f"{uri}: sha256 after upload {actual[:16]}… differs from {self.local[rel][:16]}…")
            print(f"export: {uri} ({(self.bundle_dir / rel).stat().st_size} bytes, sha256 verified)")

    def check_published(self) -> str | None:
        """None when the published bundle verifies and equals the local folder file for file; else what is wrong."""
        with tempfile.TemporaryDirectory() as tmp:
            try:
                copy = read_bundle(self.target, cache_dir=Path(tmp))
            except IncompleteBundle:
                return (
                    f"has no {BUNDLE_FILE} any more although it was just read from the store (removed meanwhile by "
                    "another writer, or the S3 server lost it)"
                )
            except BundleError as exc:
                return f"does not verify ([{exc.reason}] {exc})"
            theirs = _digests(copy.root)
        return _first_difference(self.local, theirs)

    def conflict(self, name: str, version: str, files: dict[object, object], theirs: bytes) -> str:
        """The refusal of a different candidate under a published version, naming the first differing file."""
        try:
            parsed = json.loads(theirs)
        except ValueError:
            parsed = None
        published = parsed if isinstance(parsed, dict) else {}
        their_files = published.get("files")
        their_files = their_files if isinstance(their_files, dict) else {}
        first = f"{BUNDLE_FILE} (the published one is not a JSON object)"
        if published:
            ours = {str(k): str(v) for k, v in files.items()}
            other = {str(k): str(v) for k, v in their_files.items()}
            differing = [rel for rel in sorted(set(ours) | set(other)) if ours.get(rel) != other.get(rel)]
            if differing:
                rel = differing[0]
                if rel not in other:
                    first = f"{rel}: only in this candidate"
                elif rel not in ours:
                    first = f"{rel}: only in the published bundle"
                else:
                    first = f"{rel}: published sha256 {other[rel][:16]}…, this candidate's {ours[rel][:16]}…"
            else:
                local = json.loads((self.bundle_dir / BUNDLE_FILE).read_text())
                fields = sorted(k for k in set(local) | set(published) if local.get(k) != published.get(k))
                first = f"{BUNDLE_FILE}: same files, other fields ({', '.join(fields) or 'formatting only'})"
        return (
            f"{self.target}: version {version!r} of {name!r} is already published with other contents (first "
            f"difference: {first}); versions are immutable: publish this candidate under a new version"
        )

    def interrupted(self) -> str:
        return (
            f"export of {self.target} stopped while {self.doing}. Retrying with the same candidate resumes: objects "
            f"already published with the right sha256 are kept, others replaced or removed, {BUNDLE_FILE} last."
        )


def _stage(stage: ExportStage, rel: str) -> None:
    if stage_hook is not None:
        stage_hook(stage, rel)


def _digests(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file below `root` (a bundle folder, every file alike)."""
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _first_difference(ours: dict[str, str], theirs: dict[str, str]) -> str | None:
    for rel in sorted(set(ours) | set(theirs)):
        mine, published = ours.get(rel), theirs.get(rel)
        if mine == published:
            continue
        if published is None:
            return f"lacks {rel}"
        if mine is None:
            return f"holds {rel}, which is not part of this bundle"
        return f"has {rel} with sha256 {published[:16]}… instead of {mine[:16]}…"
    return None
