"""Phase 7, export: publish a validated bundle to a local folder or ``s3://bucket/prefix`` (MinIO).

The bundle lands at ``<destination>/<name>/<version>/`` — a layout usable directly as a KServe
``storageUri``. Every file but `bundle.json` is uploaded first and its sha256 checked after upload (read back
from the store); `bundle.json` goes last, so a reader never sees half a bundle; finally the published bundle is
re-verified through `serving.bundle.read_bundle`. An existing version is never overwritten.
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

import hashlib
import json
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


def run(bundle_dir: Path, destination: str, overwrite: bool = False, threshold_at_half: bool = False) -> ExportResult:
    """Publish the bundle in `bundle_dir` below `destination`; returns the published URI.

    `threshold_at_half` publishes a derived bundle whose served probability is the calibrated one remapped
    monotonically so the chosen threshold lands on 0.5 (for consumers that always cut at 0.5)."""
    if threshold_at_half:
        with tempfile.TemporaryDirectory() as tmp:
            derived = derive_threshold_at_half(bundle_dir, Path(tmp) / "bundle")
            return run(derived, destination, overwrite)
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


def derive_threshold_at_half(bundle_dir: Path, out_dir: Path) -> Path:
    """A copy of a binary bundle whose calibrator remaps its decision threshold to 0.5 (same decisions)."""
    from serving.bundle import write_bundle
    from serving.calibrators import ThresholdAtHalfCalibrator
    from serving.policies import ThresholdPolicy

    bundle = read_bundle(bundle_dir)
    if bundle.positive_class is None or len(bundle.classes) != 2:
        raise ExportError("threshold_at_half needs a binary bundle (two classes and a positive class)")
    threshold = _calibrated_threshold(bundle.policy.to_dict())
    calibrator = ThresholdAtHalfCalibrator(2, bundle.classes.index(bundle.positive_class), bundle.calibrator, threshold)
    manifest = {k: v for k, v in bundle.manifest.items() if k != "files"}
    manifest["calibrator"] = calibrator.to_dict()
    manifest["policy"] = ThresholdPolicy(0.5, "calibrated", "binary", calibrator.positive_index).to_dict()
    manifest["version"] = f"{bundle.version}-half"
    manifest["derived_from"] = {"version": bundle.version, "threshold_at_half": threshold}
    card = json.loads((bundle_dir / "model_card.json").read_text())
    card["version"] = manifest["version"]
    extras = {
        p.relative_to(bundle_dir).as_posix(): p for p in sorted((bundle_dir / "reports").rglob("*")) if p.is_file()
    }
    write_bundle(out_dir, manifest, [m.weights for m in bundle.members], card, extras)
    return out_dir


def _calibrated_threshold(policy: dict[str, object]) -> float:
    """The binary decision threshold of a policy (a threshold policy, or a hybrid's threshold sub-policy)."""
    candidates = [policy]
    subs = policy.get("policies")
    if isinstance(subs, dict):
        active = subs.get(str(policy.get("active")))
        candidates = [p for p in (active, *subs.values()) if isinstance(p, dict)]
    for p in candidates:
        if p.get("kind") == "threshold" and p.get("task") == "binary":
            if p.get("space") != "calibrated":
                raise ExportError(
                    "threshold_at_half needs the threshold in the calibrated probability space; this bundle's is "
                    f"{p.get('space')!r} (the calibration kept it raw, e.g. isotonic); calibrate with temperature, "
                    "platt or beta"
                )
            return float(str(p["threshold"]))
    raise ExportError("threshold_at_half needs a binary threshold policy; the bundle has none")


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
    threshold_at_half: bool = False,
) -> str:
    """Publish the validated bundle to <destination>/<name>/<version>/ (a local folder or s3://bucket/prefix,
    credentials from the environment), checksums verified after upload, bundle.json last, then re-verified.
    threshold_at_half: publish a binary bundle whose probability is remapped so the chosen threshold is 0.5.
    Returns the published URI (a KServe storageUri)."""
    import json
    from pathlib import Path

    from components.export import run

    result = run(Path(bundle.path), destination, threshold_at_half=threshold_at_half)
    published.metadata.update({"bundle_uri": result.uri, "version": result.version})
    Path(published.path).parent.mkdir(parents=True, exist_ok=True)
    Path(published.path).write_text(json.dumps({"uri": result.uri, "version": result.version}) + "\n")
    Path(summary.path).write_text(f"## Export\n\nPublished `{result.uri}` ({result.files} files).\n")
    return result.uri
