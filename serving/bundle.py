"""The bundle: the contract between training and serving (DESIGN.md, "Contracts").

Layout of a bundle folder (local, ``s3://bucket/name/version/``, or KServe's ``/mnt/models``)::

    bundle.json              the manifest, written LAST: its presence means the bundle is complete
    model_card.json          name, description, version, submission time, optional submitter
    weights/member-0.safetensors [, member-1 ...]   one file per ensemble member (never pickle)
    reports/...              optional human-readable reports (validation, plots)

`bundle.json` holds the schema version, name, version, creation time, the task (classes, positive class,
input size and channels), the members (architecture spec + weights file), the preprocessing spec and its
signature, the calibrator, the decision policy, metrics per split, provenance (recipe, recipe hash, data and
split fingerprints, code version, parent bundle) and the sha256 of every other file.

`read_bundle` fails closed: a missing manifest, an unknown schema version, a missing field, a checksum
mismatch (or a missing / unlisted weights file), a preprocessing signature that differs from this runtime's, or
an inconsistent policy each raise a `BundleError` subclass whose `reason` names the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from serving import storage
from serving.calibrators import Calibrator, CalibratorError, calibrator_from_dict
from serving.models import ArchSpec, VisionClassifier, build_model, load_weights
from serving.policies import DecisionPolicy, Decisions, PolicyError, apply_policy, policy_from_dict
from serving.preprocessing import PreprocessError, PreprocessSpec, to_model_input

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
BUNDLE_FILE = "bundle.json"
MODEL_CARD_FILE = "model_card.json"

REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "": (
        "schema_version",
        "name",
        "version",
        "created",
        "task",
        "members",
        "preprocessing",
        "calibrator",
        "policy",
        "metrics",
        "provenance",
        "files",
    ),
    "task": ("classes", "positive_class", "input_size", "channels"),
    "preprocessing": ("spec", "signature"),
    "provenance": (
        "recipe",
        "recipe_hash",
        "data_fingerprint",
        "split_fingerprints",
        "code_version",
        "parent_bundle",
    ),
}
MODEL_CARD_FIELDS = ("name", "description", "version", "submitted")

FloatArray = npt.NDArray[np.float64]


class BundleError(ValueError):
    """The bundle does not verify; `reason` names the failed check."""

    reason = "invalid"


class IncompleteBundle(BundleError):
    reason = "incomplete"


class UnknownSchema(BundleError):
    reason = "unknown_schema"


class MissingField(BundleError):
    reason = "missing_field"


class ChecksumMismatch(BundleError):
    reason = "checksum_mismatch"


class SignatureMismatch(BundleError):
    reason = "preprocessing_signature"


class InconsistentPolicy(BundleError):
    reason = "inconsistent_policy"


@dataclass(frozen=True)
class Member:
    arch: ArchSpec
    weights: Path


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, ready to build its models."""

    root: Path
    manifest: dict[str, object]
    classes: tuple[str, ...]
    positive_class: str | None
    preprocess: PreprocessSpec
    calibrator: Calibrator
    policy: DecisionPolicy
    members: tuple[Member, ...]

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def signature(self) -> str:
        return self.preprocess.signature

    def load_models(self) -> list[VisionClassifier]:
        models = []
        for member in self.members:
            model = build_model(member.arch)
            load_weights(model, member.weights)
            models.append(model.eval())
        return models


# ------------------------------------------------------------------------------------------------- writing


def write_bundle(
    out_dir: Path,
    manifest: dict[str, object],
    weights: list[Path],
    model_card: dict[str, object],
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write a bundle folder: weights, model card and extra files first, then `bundle.json` (atomically).

    `manifest` holds every field but `members[*].weights` paths (taken from `weights`, one per member) and
    `files` (computed here). Returns the path of `bundle.json`.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    members = _as_list(manifest.get("members"), "members")
    if len(members) != len(weights):
        raise BundleError(f"{len(members)} members but {len(weights)} weights files")
    placed: dict[str, Path] = {}
    for i, src in enumerate(weights):
        placed[f"weights/member-{i}.safetensors"] = src
    placed.update(extra_files or {})
    for rel, src in placed.items():
        dest = out_dir / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if src.resolve() != dest.resolve():
            shutil.copyfile(src, dest)
    _write_json_file(out_dir / MODEL_CARD_FILE, model_card)
    full = dict(manifest)
    full["members"] = [
        {**_as_dict(m, "members[]"), "weights": f"weights/member-{i}.safetensors"} for i, m in enumerate(members)
    ]
    full["files"] = {rel: sha256_file(out_dir / rel) for rel in sorted([*placed, MODEL_CARD_FILE])}
    full["schema_version"] = SCHEMA_VERSION
    _write_json_file(out_dir / BUNDLE_FILE, full)
    return out_dir / BUNDLE_FILE


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------- reading


def read_bundle(location: str | Path, cache_dir: Path | None = None) -> Bundle:
    """Fetch (when remote) and verify a bundle; raises a `BundleError` subclass naming the failed check."""
    root = fetch_bundle(str(location), cache_dir)
    manifest = _load_manifest(root)
    _check_schema(manifest)
    _check_fields(manifest)
    _check_checksums(root, manifest)
    preprocess = _check_preprocessing(manifest)
    calibrator, policy = _check_decision(manifest)
    task = _as_dict(manifest["task"], "task")
    positive = task["positive_class"]
    return Bundle(
        root=root,
        manifest=manifest,
        classes=tuple(str(c) for c in _as_list(task["classes"], "task.classes")),
        positive_class=None if positive is None else str(positive),
        preprocess=preprocess,
        calibrator=calibrator,
        policy=policy,
        members=_members(root, manifest),
    )


def fetch_bundle(location: str, cache_dir: Path | None = None) -> Path:
    """A local folder holding the bundle: the folder itself, or a fresh download of an s3:// prefix."""
    if not storage.is_s3(location):
        root = Path(location[len("file://") :] if location.startswith("file://") else location)
        if not (root / BUNDLE_FILE).is_file():
            raise IncompleteBundle(
                f"{location}: no {BUNDLE_FILE}; the bundle is incomplete (half uploaded?) or this is not a bundle"
            )
        return root
    if not storage.exists(storage.join(location, BUNDLE_FILE)):
        raise IncompleteBundle(
            f"{location}: no {BUNDLE_FILE}; the bundle is incomplete (half uploaded?) or this is not a bundle"
        )
    target = Path(tempfile.mkdtemp(prefix="bundle-", dir=cache_dir))
    return storage.download_prefix(location, target)


def verify_report(location: str | Path) -> tuple[bool, str]:
    """(ok, human-readable report) for `visionpipe validate-bundle`."""
    try:
        bundle = read_bundle(location)
    except BundleError as exc:
        return False, f"REFUSED [{exc.reason}] {exc}"
    except storage.StorageError as exc:
        return False, f"REFUSED [storage] {exc}"
    metrics = _as_dict(bundle.manifest.get("metrics", {}), "metrics")
    lines = [
        f"OK {bundle.name} version {bundle.version} ({len(bundle.members)} member(s))",
        f"  classes: {', '.join(bundle.classes)}"
        + (f" (positive: {bundle.positive_class})" if bundle.positive_class else ""),
        f"  preprocessing: {bundle.signature}",
        f"  calibrator: {bundle.calibrator.to_dict().get('method')}",
        f"  policy: {bundle.policy.to_dict().get('kind')}",
        f"  files verified: {len(_as_dict(bundle.manifest['files'], 'files'))} (sha256)",
    ]
    for split, values in sorted(metrics.items()):
        if isinstance(values, dict):
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items()) if isinstance(v, int | float))
            lines.append(f"  {split}: {shown}")
    return True, "\n".join(lines)


# ------------------------------------------------------------------------------------------------ runtime


@dataclass(frozen=True)
class Prediction:
    raw_probs: FloatArray
    calibrated_probs: FloatArray
    decisions: Decisions


class BundleModel:
    """The verified bundle's models in eval mode, with the bundle's calibrator and policy."""

    def __init__(self, bundle: Bundle) -> None:
        self.bundle = bundle
        self.models = bundle.load_models()

    @torch.inference_mode()
    def log_probs(self, x: torch.Tensor) -> FloatArray:
        """Ensemble log-probabilities (log of the members' mean softmax) for preprocessed input x."""
        probs = torch.stack([torch.softmax(m(x).double(), dim=1) for m in self.models]).mean(0)
        return np.asarray(torch.log(probs.clamp_min(1e-300)).numpy(), dtype=np.float64)

    def predict_images(self, images: npt.NDArray[np.uint8], batch_size: int = 256) -> Prediction:
        """uint8 NHWC images -> raw and calibrated probabilities and the policy's decisions."""
        parts = [
            self.log_probs(to_model_input(images[i : i + batch_size], self.bundle.preprocess))
            for i in range(0, len(images), batch_size)
        ]
        return self.decide(np.concatenate(parts) if parts else np.zeros((0, len(self.bundle.classes))))

    def probabilities(self, log_probs: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(raw softmax, calibrated) probabilities of ensemble log-probabilities."""
        calibrated = np.asarray(self.bundle.calibrator.probabilities(log_probs), dtype=np.float64)
        return _softmax(log_probs), calibrated

    def decide(self, log_probs: FloatArray) -> Prediction:
        raw, calibrated = self.probabilities(log_probs)
        return Prediction(raw, calibrated, apply_policy(self.bundle.policy, calibrated, raw))


# ---------------------------------------------------------------------------------------------- checks


def _load_manifest(root: Path) -> dict[str, object]:
    try:
        data = json.loads((root / BUNDLE_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{root / BUNDLE_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise BundleError(f"{root / BUNDLE_FILE}: expected a JSON object")
    return data


def _check_schema(manifest: dict[str, object]) -> None:
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMAS:
        raise UnknownSchema(
            f"bundle schema_version={version!r} is not supported by this runtime (supported: {SUPPORTED_SCHEMAS})"
        )


def _check_fields(manifest: dict[str, object]) -> None:
    for section, fields in REQUIRED_FIELDS.items():
        obj = manifest if not section else manifest.get(section)
        if not isinstance(obj, dict):
            raise MissingField(f"bundle.json: missing field {section!r} (or it is not an object)")
        for name in fields:
            if name not in obj:
                raise MissingField(f"bundle.json: missing field {(section + '.' if section else '') + name!r}")
    members = manifest["members"]
    if not isinstance(members, list) or not members:
        raise MissingField("bundle.json: 'members' must list at least one model")
    for i, m in enumerate(members):
        if not isinstance(m, dict) or "architecture" not in m or "weights" not in m:
            raise MissingField(f"bundle.json: members[{i}] needs 'architecture' and 'weights'")


def _check_checksums(root: Path, manifest: dict[str, object]) -> None:
    files = _as_dict(manifest["files"], "files")
    for rel, expected in sorted(files.items()):
        path = root / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise ChecksumMismatch(f"files: {rel!r} points outside the bundle")
        if not path.is_file():
            raise ChecksumMismatch(f"{rel}: listed in bundle.json but missing from the bundle")
        actual = sha256_file(path)
        if actual != expected:
            raise ChecksumMismatch(f"{rel}: sha256 {actual[:16]}… does not match bundle.json ({str(expected)[:16]}…)")
    for i, m in enumerate(_as_list(manifest["members"], "members")):
        weights = str(_as_dict(m, "members[]")["weights"])
        if weights not in files:
            raise ChecksumMismatch(f"members[{i}].weights={weights!r} has no checksum in bundle.json 'files'")
        if not weights.endswith(".safetensors"):
            raise BundleError(f"members[{i}].weights={weights!r}: weights must be safetensors")


def _check_preprocessing(manifest: dict[str, object]) -> PreprocessSpec:
    section = _as_dict(manifest["preprocessing"], "preprocessing")
    try:
        spec = PreprocessSpec.from_dict(_as_dict(section["spec"], "preprocessing.spec"))
    except PreprocessError as exc:
        raise BundleError(f"preprocessing.spec: {exc}") from exc
    stored = section["signature"]
    if stored != spec.signature:
        raise SignatureMismatch(
            f"preprocessing signature {stored!r} differs from this runtime's {spec.signature!r} for the same spec; "
            "the bundle was trained with different preprocessing"
        )
    return spec


def _check_decision(manifest: dict[str, object]) -> tuple[Calibrator, DecisionPolicy]:
    try:
        calibrator = calibrator_from_dict(_as_dict(manifest["calibrator"], "calibrator"))
    except CalibratorError as exc:
        raise BundleError(f"calibrator: {exc}") from exc
    try:
        policy = policy_from_dict(_as_dict(manifest["policy"], "policy"))
    except PolicyError as exc:
        raise InconsistentPolicy(f"policy: {exc}") from exc
    return calibrator, policy


def _members(root: Path, manifest: dict[str, object]) -> tuple[Member, ...]:
    out = []
    task = _as_dict(manifest["task"], "task")
    for i, m in enumerate(_as_list(manifest["members"], "members")):
        member = _as_dict(m, f"members[{i}]")
        try:
            arch = ArchSpec.from_dict(_as_dict(member["architecture"], f"members[{i}].architecture"))
        except ValueError as exc:
            raise BundleError(f"members[{i}].architecture: {exc}") from exc
        if arch.num_classes != len(_as_list(task["classes"], "task.classes")):
            raise BundleError(f"members[{i}]: {arch.num_classes} outputs but the task has other class count")
        out.append(Member(arch=arch, weights=root / str(member["weights"])))
    return tuple(out)


def _softmax(log_probs: FloatArray) -> FloatArray:
    z = log_probs - log_probs.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def _write_json_file(path: Path, payload: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, path)


def _as_dict(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise MissingField(f"bundle.json: {where} must be an object")
    return value


def _as_list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise MissingField(f"bundle.json: {where} must be a list")
    return value
