"""Phase 7, export: publish a validated bundle to a local folder or ``s3://bucket/prefix`` (MinIO).

The bundle lands at ``<destination>/<name>/<version>/`` — a layout usable directly as a KServe
``storageUri``. Every file but `bundle.json` is uploaded first and its sha256 checked after upload (read back
from the store); `bundle.json` goes last, so a reader never sees half a bundle; finally the published bundle is
re-verified through `serving.bundle.read_bundle`. An existing version is never overwritten.
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

import hashlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kfp.dsl import Artifact, Input, Markdown, Model, Output

from components._kfp import component
from serving import storage
from serving.bundle import BUNDLE_FILE, BundleError, read_bundle


class ExportError(RuntimeError):
    """Publishing failed; nothing readable was left behind (no bundle.json at the target)."""


@dataclass(frozen=True)
class ExportResult:
    uri: str
    files: int
    version: str


def run(bundle_dir: Path, destination: str, overwrite: bool = False) -> ExportResult:
    """Publish the bundle in `bundle_dir` below `destination`; returns the published URI."""
    manifest = read_bundle(bundle_dir).manifest  # refuse to publish anything that does not verify
    name, version = str(manifest["name"]), str(manifest["version"])
    if not storage.is_s3(destination):
        destination = str(Path(destination).resolve())
    target = storage.join(destination, name, version)
    if storage.exists(storage.join(target, BUNDLE_FILE)) and not overwrite:
        raise ExportError(f"{target} already holds a published bundle; versions are immutable")
    files = manifest["files"]
    assert isinstance(files, dict)
    for rel, expected in sorted(files.items()):
        uri = storage.join(target, rel)
        storage.upload_file(bundle_dir / rel, uri)
        actual = hashlib.sha256(storage.read_bytes(uri)).hexdigest()
        if actual != expected:
            raise ExportError(f"{uri}: sha256 after upload {actual[:16]}… differs from {str(expected)[:16]}…")
        print(f"export: {uri} ({(bundle_dir / rel).stat().st_size} bytes, sha256 verified)")
    _publish_extras(bundle_dir, target, set(files))
    storage.upload_file(bundle_dir / BUNDLE_FILE, storage.join(target, BUNDLE_FILE))
    _reverify(target)
    print(f"export: published {target}")
    return ExportResult(uri=target, files=len(files) + 1, version=version)


def _publish_extras(bundle_dir: Path, target: str, listed: set[str]) -> None:
    """Reports and plots beside the bundle (not part of the checksummed contract)."""
    for path in sorted(bundle_dir.rglob("*")):
        rel = path.relative_to(bundle_dir).as_posix()
        if path.is_file() and rel not in listed and rel != BUNDLE_FILE:
            storage.upload_file(path, storage.join(target, rel))


def _reverify(target: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            read_bundle(target, cache_dir=Path(tmp))
        except BundleError as exc:
            raise ExportError(f"{target}: the published bundle does not verify: {exc}") from exc


@component
def export(
    bundle: Input[Model],
    published: Output[Artifact],
    summary: Output[Markdown],
    destination: str = "bundles",
) -> str:
    """Publish the validated bundle to <destination>/<name>/<version>/ (a local folder or s3://bucket/prefix,
    credentials from the environment), checksums verified after upload, bundle.json last, then re-verified.
    Returns the published URI (a KServe storageUri)."""
    import json
    from pathlib import Path

    from components.export import run

    result = run(Path(bundle.path), destination)
    published.metadata.update({"bundle_uri": result.uri, "version": result.version})
    Path(published.path).parent.mkdir(parents=True, exist_ok=True)
    Path(published.path).write_text(json.dumps({"uri": result.uri, "version": result.version}) + "\n")
    Path(summary.path).write_text(f"## Export\n\nPublished `{result.uri}` ({result.files} files).\n")
    return result.uri
