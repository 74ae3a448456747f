"""The bundle: the contract between training and serving (DESIGN.md, "Contracts").

Layout of a bundle folder (local, ``s3://bucket/name/version/``, or KServe's ``/mnt/models``)::

    bundle.json              the manifest, written LAST: its presence means the bundle is complete
    bundle.sig               Ed25519 signature of bundle.json (visionpipe/serving/signing.py), written just before it
    model_card.json          name, description, version, submission time, optional submitter
    weights/member-0.safetensors [, member-1 ...]   one file per ensemble member (never pickle)
    compiled/member-0.onnx [, ...]   optional: each member exported to ONNX (visionpipe/serving/compiled.py), named
                             by its member's ``compiled`` entry, listed and hashed like every other file
    drift_reference.json     what the served bundle saw on val_test, for drift monitoring (visionpipe/monitoring/
                             drift.py); listed and hashed like every other file, so it verifies with the bundle
    reports/...              optional human-readable reports (validation, plots)

`bundle.json` holds the schema version, name, version, creation time, the task (classes, positive class,
input size and channels), the members (architecture spec + weights file), the preprocessing spec and its
signature, the calibrator, the decision policy, metrics per split, provenance (recipe, recipe hash, data and
split fingerprints, code version, parent bundle) and the sha256 of every other file (`files`). Signing
bundle.json therefore covers every file it lists.

`read_bundle` fails closed, in this order, each failure a `BundleError` subclass whose `reason` names the check:

- layout: ``symlink`` (any symbolic link in the bundle), ``special_file`` (a fifo, device, socket),
  ``bundle_too_large`` (more than `VerifyLimits.max_files` files or `max_total_bytes` bytes), ``incomplete``
  (no bundle.json), ``unreadable``;
- manifest: ``manifest_too_large`` (bounded read, 1 MiB by default), ``invalid_utf8``, ``json_too_deep`` (nesting
  measured before parsing, 32 by default), ``invalid_json`` (also duplicate keys);
- signature (before any field is used): ``unsigned`` (no bundle.sig), ``bad_signature`` (a malformed bundle.sig,
  or bundle.json changed since it was signed), ``untrusted_key`` (signed by a key not in `VISIONPIPE_TRUSTED_KEYS`
  / the local key), ``key_config`` (a malformed trusted-key setting). ``allow_unsigned=True`` is the explicit
  opt-out: it accepts an unsigned bundle and one signed by an untrusted key, but still refuses a bad signature;
- contents: ``unknown_schema``, ``missing_field``, ``unlisted_file`` (a file `files` does not list; only
  ``reports/`` may hold unlisted, never-loaded reports: `UNLISTED_ANNEX`), ``checksum_mismatch``,
  ``preprocessing_signature``, ``inconsistent_policy``, ``invalid_architecture``, ``param_budget`` (parameters
  counted from the spec, nothing built), ``memory_budget`` (state-dict or activation bytes), ``compiled_model`` (a
  member's ``compiled`` entry that is malformed: unknown format, not a plain ``.onnx`` file; a compiled file that is
  missing or has no checksum is ``checksum_mismatch``, as for weights).

`Bundle.load_models` (so `BundleModel`, `verify_bundle` and `visionpipe validate-bundle`) goes on: it builds each
member on the ``meta`` device (no storage), reads its weights once into memory and checks their sha256 against
the signed manifest, parses the safetensors header itself with the header length checked first
(``header_too_large``: above `VerifyLimits.max_header_bytes` or beyond the file), refuses anything else
(``not_safetensors``: a pickle, a zip, a truncated or malformed file), compares every tensor's name, shape and
dtype with the model's state dict (``weights_mismatch``), refuses NaN / Inf (``non_finite_weights``) and runs one
forward pass on a blank input of the preprocessing shape (``forward_failed``, ``non_finite_output``).

`BundleModel(bundle, runtime="onnx")` also loads every member's compiled file (`Bundle.load_compiled`): its bytes
read once and checked against the signed sha256 (``checksum_mismatch``), then parsed and run on a blank input by
visionpipe/serving/compiled.py (``compiled_model``: not ONNX, external data, wrong input / output signature,
failing or non-finite forward); a bundle without compiled files is refused for that runtime (``no_compiled_model``).
The torch members are loaded (and checked) either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from visionpipe.serving import compiled as C
from visionpipe.serving import signing, storage
from visionpipe.serving.calibrators import Calibrator, CalibratorError, calibrator_from_dict
from visionpipe.serving.models import (
    ModelBudget,
    ModelBudgetError,
    VisionClassifier,
    build_model_meta,
    check_budget,
    state_dict_bytes,
)
from visionpipe.serving.policies import DecisionPolicy, Decisions, PolicyError, apply_policy, policy_from_dict
from visionpipe.serving.views import aggregate_views, predict_rows
from visionpipe.specs import ArchSpec, ArchSpecError, PreprocessError, PreprocessSpec

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
BUNDLE_FILE = "bundle.json"
SIGNATURE_FILE = signing.SIGNATURE_FILE
MODEL_CARD_FILE = "model_card.json"
DRIFT_REFERENCE_FILE = "drift_reference.json"  # = visionpipe.monitoring.drift.REFERENCE_FILE (a test keeps them equal)
# Folders whose files may be absent from `files`: human-readable reports, never opened by any loader. Every
# other unlisted file is refused.
UNLISTED_ANNEX: tuple[str, ...] = ("reports/",)

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

_MIB = 1024 * 1024


@dataclass(frozen=True)
class VerifyLimits:
    """Caps applied while verifying a bundle (all checked before the capped thing is read or allocated).

    max_manifest_bytes: bundle.json size (bounded read). max_json_depth: nesting of bundle.json and of safetensors
    headers. max_signature_bytes: bundle.sig size. max_header_bytes: a safetensors header (the file starts with
    its 8-byte little-endian length). max_files / max_total_bytes: the whole bundle folder. model: the
    architecture budget (parameters, state-dict bytes, activation bytes, layers), see
    `visionpipe.serving.models.ModelBudget`.
    """

    max_manifest_bytes: int = _MIB
    max_json_depth: int = 32
    max_signature_bytes: int = 16 * 1024
    max_header_bytes: int = 16 * _MIB
    max_files: int = 10_000
    max_total_bytes: int = 16 * 1024 * _MIB
    model: ModelBudget = field(default_factory=ModelBudget)


DEFAULT_LIMITS = VerifyLimits()


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


class Unsigned(BundleError):
    reason = "unsigned"


class BadSignature(BundleError):
    reason = "bad_signature"


class UntrustedKey(BundleError):
    reason = "untrusted_key"


class KeyConfig(BundleError):
    reason = "key_config"


class SymlinkInBundle(BundleError):
    reason = "symlink"


class SpecialFile(BundleError):
    reason = "special_file"


class UnlistedFile(BundleError):
    reason = "unlisted_file"


class BundleTooLarge(BundleError):
    reason = "bundle_too_large"


class Unreadable(BundleError):
    reason = "unreadable"


class ManifestTooLarge(BundleError):
    reason = "manifest_too_large"


class InvalidUtf8(BundleError):
    reason = "invalid_utf8"


class InvalidJson(BundleError):
    reason = "invalid_json"


class JsonTooDeep(BundleError):
    reason = "json_too_deep"


class InvalidArchitecture(BundleError):
    reason = "invalid_architecture"


class ParamBudget(BundleError):
    reason = "param_budget"


class MemoryBudget(BundleError):
    reason = "memory_budget"


class NotSafetensors(BundleError):
    reason = "not_safetensors"


class HeaderTooLarge(BundleError):
    reason = "header_too_large"


class WeightsMismatch(BundleError):
    reason = "weights_mismatch"


class NonFiniteWeights(BundleError):
    reason = "non_finite_weights"


class ForwardFailed(BundleError):
    reason = "forward_failed"


class NonFiniteOutput(BundleError):
    reason = "non_finite_output"


class CompiledModelInvalid(BundleError):
    reason = "compiled_model"


class NoCompiledModel(BundleError):
    reason = "no_compiled_model"


_SIGNATURE_ERRORS: dict[str, type[BundleError]] = {
    "unsigned": Unsigned,
    "bad_signature": BadSignature,
    "untrusted_key": UntrustedKey,
}


@dataclass(frozen=True)
class CompiledFile:
    """A member's compiled model (visionpipe/serving/compiled.py): its format, file and listed sha256."""

    format: str
    path: Path
    sha256: str


@dataclass(frozen=True)
class Member:
    arch: ArchSpec
    weights: Path
    sha256: str | None = None  # the digest bundle.json lists for `weights` (checked again on the bytes loaded)
    compiled: CompiledFile | None = None


@dataclass(frozen=True)
class Bundle:
    """A verified bundle, ready to build its models.

    signature_status: ``verified`` (signed by `signed_by`, a trusted key id), or, only when read with
    ``allow_unsigned=True``, ``unsigned`` / ``untrusted_key``."""

    root: Path
    manifest: dict[str, object]
    classes: tuple[str, ...]
    positive_class: str | None
    preprocess: PreprocessSpec
    calibrator: Calibrator
    policy: DecisionPolicy
    members: tuple[Member, ...]
    signed_by: str | None = None
    signature_status: str = "verified"
    limits: VerifyLimits = DEFAULT_LIMITS

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def version(self) -> str:
        return str(self.manifest["version"])

    @property
    def signature(self) -> str:
        return self.preprocess.signature

    @property
    def drift_reference(self) -> Path | None:
        """The verified drift reference file (listed in `files`, checksum checked), or None for a bundle without."""
        files = self.manifest.get("files")
        return self.root / DRIFT_REFERENCE_FILE if isinstance(files, dict) and DRIFT_REFERENCE_FILE in files else None

    @property
    def has_compiled(self) -> bool:
        """Every member ships a compiled (ONNX) model."""
        return all(m.compiled is not None for m in self.members)

    def load_models(self) -> list[VisionClassifier]:
        """Every member's model in eval mode, through the checked loading (`load_member`)."""
        return [load_member(member, self.preprocess, self.limits) for member in self.members]

    def load_compiled(self, threads: int | None = None) -> list[C.OnnxMember]:
        """Every member's ONNX Runtime session, through the checked loading (`load_compiled_member`)."""
        missing = [i for i, m in enumerate(self.members) if m.compiled is None]
        if missing:
            raise NoCompiledModel(
                f"{self.name} {self.version}: member(s) {missing} ship no compiled model; serve it with --runtime "
                "torch, or rebuild the bundle with compiled_runtime=onnx"
            )
        return [load_compiled_member(m, self.preprocess, self.limits, threads) for m in self.members]


# ------------------------------------------------------------------------------------------------- writing


def write_bundle(
    out_dir: Path,
    manifest: dict[str, object],
    weights: list[Path],
    model_card: dict[str, object],
    extra_files: dict[str, Path] | None = None,
    *,
    sign: bool = True,
    signing_key: Ed25519PrivateKey | None = None,
) -> Path:
    """Write a bundle folder: weights, model card and extra files, then `bundle.sig`, then `bundle.json`.

    `manifest` holds every field but `members[*].weights` paths (taken from `weights`, one per member) and
    `files` (computed here; `extra_files` are listed too). Signing is the default and always possible:
    `signing_key`, else `VISIONPIPE_SIGNING_KEY`, else the local key (generated on first use; see
    visionpipe/serving/signing.py). ``sign=False`` writes an unsigned bundle, which readers refuse unless they pass
    ``allow_unsigned=True``. Returns the path of `bundle.json`.
    """
    key = _signing_key(signing_key) if sign else None  # a misconfigured key fails before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / BUNDLE_FILE).unlink(missing_ok=True)  # while rewriting, the folder is not a complete bundle
    members = _as_list(manifest.get("members"), "members")
    if len(members) != len(weights):
        raise BundleError(f"{len(members)} members but {len(weights)} weights files")
    placed: dict[str, Path] = {}
    for i, src in enumerate(weights):
        placed[f"weights/member-{i}.safetensors"] = src
    placed.update(extra_files or {})
    for rel, src in placed.items():
        _check_relpath(rel)
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
    return _seal(out_dir, full, key)


def reseal_bundle(
    root: Path,
    add: Sequence[str] = (),
    *,
    signing_key: Ed25519PrivateKey | None = None,
    allow_unsigned: bool = False,
) -> Path:
    """Re-sign a local bundle, listing (checksumming) the files in `add` too; returns the path of bundle.json.

    For a report written after validation (``add=["reports/validation.md"]``), for key rotation (re-sign with
    the new key while the old one is still trusted) and, with ``allow_unsigned=True``, to sign a bundle written
    before signing existed. The bundle is verified first (layout, signature unless `allow_unsigned`,
    checksums), so a tampered bundle is never re-signed."""
    key = _signing_key(signing_key)
    for rel in add:
        _check_relpath(rel)
    bundle = _read_local(Path(root), allow_unsigned, DEFAULT_LIMITS, extra_allowed=frozenset(add))
    full = dict(bundle.manifest)
    files = dict(_as_dict(full["files"], "files"))
    for rel in add:
        files[rel] = _sha256_regular(bundle.root / rel, rel)
    full["files"] = dict(sorted(files.items()))
    (bundle.root / BUNDLE_FILE).unlink()
    return _seal(bundle.root, full, key)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _signing_key(explicit: Ed25519PrivateKey | None) -> Ed25519PrivateKey:
    if explicit is not None:
        return explicit
    try:
        return signing.default_signing_key()
    except signing.KeyConfigError as exc:
        raise KeyConfig(str(exc)) from exc


def _seal(out_dir: Path, full: dict[str, object], key: Ed25519PrivateKey | None) -> Path:
    """Write bundle.sig (or remove a stale one when `key` is None), then bundle.json, each atomically."""
    text = json.dumps(full, sort_keys=True, indent=1) + "\n"
    if len(text.encode("utf-8")) > DEFAULT_LIMITS.max_manifest_bytes:
        raise ManifestTooLarge(
            f"bundle.json would have {len(text):,} bytes; readers refuse more than "
            f"{DEFAULT_LIMITS.max_manifest_bytes:,}"
        )
    if key is None:
        (out_dir / SIGNATURE_FILE).unlink(missing_ok=True)
    else:
        signed = signing.sign_manifest(json.loads(text), key)  # sign what readers will parse
        _write_bytes(out_dir / SIGNATURE_FILE, signed.to_bytes())
    _write_bytes(out_dir / BUNDLE_FILE, text.encode("utf-8"))
    return out_dir / BUNDLE_FILE


# ------------------------------------------------------------------------------------------------- reading


def read_bundle(
    location: str | Path,
    cache_dir: Path | None = None,
    *,
    allow_unsigned: bool = False,
    limits: VerifyLimits = DEFAULT_LIMITS,
) -> Bundle:
    """Fetch (when remote) and verify a bundle; raises a `BundleError` subclass naming the failed check.

    The signature is required unless ``allow_unsigned=True`` (an explicit opt-in). Weights are checked when the
    models are built (`Bundle.load_models`); `verify_bundle` does both."""
    root = fetch_bundle(str(location), cache_dir)
    return _read_local(root, allow_unsigned, limits)


def verify_bundle(
    location: str | Path,
    cache_dir: Path | None = None,
    *,
    allow_unsigned: bool = False,
    limits: VerifyLimits = DEFAULT_LIMITS,
) -> tuple[Bundle, list[VisionClassifier]]:
    """`read_bundle` and the checked loading of every member: what serving does before it answers."""
    bundle = read_bundle(location, cache_dir, allow_unsigned=allow_unsigned, limits=limits)
    return bundle, bundle.load_models()


def fetch_bundle(location: str, cache_dir: Path | None = None) -> Path:
    """A local folder holding the bundle: the folder itself, or a fresh download of an s3:// prefix."""
    if not storage.is_s3(location):
        root = Path(location[len("file://") :] if location.startswith("file://") else location)
        if not (root / BUNDLE_FILE).is_file():
            raise IncompleteBundle(
                f"{location}: no {BUNDLE_FILE}; the bundle is incomplete (half uploaded?) or this is not a bundle"
            )
        return root.resolve()  # the folder itself may be a link (KServe's /mnt/models on a PVC); nothing in it
    if not storage.exists(storage.join(location, BUNDLE_FILE)):
        raise IncompleteBundle(
            f"{location}: no {BUNDLE_FILE}; the bundle is incomplete (half uploaded?) or this is not a bundle"
        )
    target = Path(tempfile.mkdtemp(prefix="bundle-", dir=cache_dir))
    return storage.download_prefix(location, target)


@dataclass(frozen=True)
class Verification:
    """The outcome of `verify`: ok, or the refusal's reason and message; `report` is the printable text."""

    ok: bool
    report: str
    reason: str = ""
    message: str = ""


def verify(
    location: str | Path, *, allow_unsigned: bool = False, limits: VerifyLimits = DEFAULT_LIMITS
) -> Verification:
    """Verify a bundle completely (`verify_bundle`) for `visionpipe validate-bundle`; never raises BundleError."""
    try:
        bundle, models = verify_bundle(location, allow_unsigned=allow_unsigned, limits=limits)
    except BundleError as exc:
        return Verification(False, f"REFUSED [{exc.reason}] {exc}", exc.reason, str(exc))
    except storage.StorageError as exc:
        return Verification(False, f"REFUSED [storage] {exc}", "storage", str(exc))
    metrics = _as_dict(bundle.manifest.get("metrics", {}), "metrics")
    if bundle.signature_status == "verified":
        signed = f"verified, key {str(bundle.signed_by)[:16]}…"
    else:
        signed = f"NOT VERIFIED ({bundle.signature_status}; accepted because of --allow-unsigned)"
    params = ", ".join(f"{sum(p.numel() for p in m.parameters()):,}" for m in models)
    lines = [
        f"OK {bundle.name} version {bundle.version} ({len(bundle.members)} member(s))",
        f"  signature: {signed}",
        f"  classes: {', '.join(bundle.classes)}"
        + (f" (positive: {bundle.positive_class})" if bundle.positive_class else ""),
        f"  preprocessing: {bundle.signature}",
        f"  calibrator: {bundle.calibrator.to_dict().get('method')}",
        f"  policy: {bundle.policy.to_dict().get('kind')}",
        f"  files verified: {len(_as_dict(bundle.manifest['files'], 'files'))} (sha256)",
        f"  weights loaded: parameters {params}; safetensors headers, shapes, dtypes, finite values and a blank "
        "forward pass checked",
    ]
    for split, values in sorted(metrics.items()):
        if isinstance(values, dict):
            shown = ", ".join(f"{k}={v:.4f}" for k, v in sorted(values.items()) if isinstance(v, int | float))
            lines.append(f"  {split}: {shown}")
    return Verification(True, "\n".join(lines))


def verify_report(
    location: str | Path, *, allow_unsigned: bool = False, limits: VerifyLimits = DEFAULT_LIMITS
) -> tuple[bool, str]:
    """(ok, human-readable report) for `visionpipe validate-bundle`."""
    outcome = verify(location, allow_unsigned=allow_unsigned, limits=limits)
    return outcome.ok, outcome.report


def _read_local(
    root: Path, allow_unsigned: bool, limits: VerifyLimits, extra_allowed: frozenset[str] = frozenset()
) -> Bundle:
    layout = _scan_layout(root, limits)
    if BUNDLE_FILE not in layout:
        raise IncompleteBundle(f"{root}: no {BUNDLE_FILE}; the bundle is incomplete or this is not a bundle")
    manifest = _load_manifest(root, limits)
    signed_by, status = _check_signature(root, manifest, SIGNATURE_FILE in layout, allow_unsigned, limits)
    _check_schema(manifest)
    _check_fields(manifest)
    _check_listing(manifest, layout, extra_allowed)
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
        members=_members(root, manifest, preprocess, limits),
        signed_by=signed_by,
        signature_status=status,
        limits=limits,
    )


# ------------------------------------------------------------------------------------------------ runtime


@dataclass(frozen=True)
class Prediction:
    raw_probs: FloatArray
    calibrated_probs: FloatArray
    decisions: Decisions


class BundleModel:
    """The verified bundle's models in eval mode, with the bundle's calibrator and policy.

    runtime: what runs the forward pass, ``torch`` (the members' torch modules) or ``onnx`` (each member's compiled
    file in ONNX Runtime, visionpipe/serving/compiled.py; refused with ``no_compiled_model`` for a bundle without
    one). Same input (preprocessed rows as a torch tensor), same output (ensemble log-probabilities), so callers
    (the predictor, bundle validation) do not know which runs. The torch members are loaded and checked in both."""

    def __init__(self, bundle: Bundle, runtime: str = "torch") -> None:
        if runtime not in C.RUNTIMES:
            raise ValueError(f"runtime={runtime!r} is not one of {C.RUNTIMES}")
        self.bundle = bundle
        self.runtime = runtime
        self.models = bundle.load_models()
        self.compiled = bundle.load_compiled() if runtime == "onnx" else []

    @torch.inference_mode()
    def log_probs(self, x: torch.Tensor) -> FloatArray:
        """Ensemble log-probabilities (log of the members' mean softmax) for preprocessed input x."""
        if self.compiled:
            return self._compiled_log_probs(x)
        probs = torch.stack([torch.softmax(m(x).double(), dim=1) for m in self.models]).mean(0)
        return np.asarray(torch.log(probs.clamp_min(1e-300)).numpy(), dtype=np.float64)

    def _compiled_log_probs(self, x: torch.Tensor) -> FloatArray:
        """The torch path's arithmetic on ONNX Runtime's float32 logits: float64 softmax, member mean, log."""
        rows = x.detach().to("cpu", torch.float32).contiguous().numpy()
        probs = torch.stack(
            [torch.softmax(torch.from_numpy(m.logits(rows)).double(), dim=1) for m in self.compiled]
        ).mean(0)
        return np.asarray(torch.log(probs.clamp_min(1e-300)).numpy(), dtype=np.float64)

    @property
    def positive_index(self) -> int:
        """The positive class's index (binary tasks; classes[1] when the bundle names none, as the logits
        artifact reads it), which multi-view aggregation pools on."""
        bundle = self.bundle
        return bundle.classes.index(bundle.positive_class) if bundle.positive_class is not None else 1

    def aggregate(self, view_log_probs: FloatArray) -> FloatArray:
        """Per-view log-probabilities -> one row per image (identity without views; visionpipe/serving/views.py)."""
        return aggregate_views(view_log_probs, self.bundle.preprocess, self.positive_index)

    def predict_images(self, images: npt.NDArray[np.uint8], batch_size: int = 256) -> Prediction:
        """uint8 NHWC images -> raw and calibrated probabilities and the policy's decisions.

        Through `visionpipe.serving.views.predict_rows`, the code supervised_train's logits and the served
        predictor use: the shared preprocessing, and with views each image's global view + tiles in one forward
        pass, aggregated in log-probability space."""
        if len(images) == 0:
            return self.decide(np.zeros((0, len(self.bundle.classes))))
        spec = self.bundle.preprocess
        return self.decide(predict_rows(self.log_probs, images, spec, self.positive_index, batch_size))

    def probabilities(self, log_probs: FloatArray) -> tuple[FloatArray, FloatArray]:
        """(raw softmax, calibrated) probabilities of ensemble log-probabilities."""
        calibrated = np.asarray(self.bundle.calibrator.probabilities(log_probs), dtype=np.float64)
        return _softmax(log_probs), calibrated

    def decide(self, log_probs: FloatArray) -> Prediction:
        raw, calibrated = self.probabilities(log_probs)
        return Prediction(raw, calibrated, apply_policy(self.bundle.policy, calibrated, raw))


# ----------------------------------------------------------------------------------------- checked loading

# safetensors dtype names (https://github.com/huggingface/safetensors, format spec) -> torch dtypes
_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_SAFETENSORS_HEADER_DEPTH = 4  # {name: {"shape": [...]}} is 3 deep; __metadata__ is a flat str -> str map


def load_member(member: Member, preprocess: PreprocessSpec, limits: VerifyLimits = DEFAULT_LIMITS) -> VisionClassifier:
    """Build one member's model from its spec and weights, every step checked; the model is in eval mode.

    Budget first (nothing allocated), then the model on the ``meta`` device (shapes only), then the weights
    (bounded read, sha256, strict safetensors parse against the state dict, finite values), assigned into the
    meta model (no second copy, no random initialisation), then one forward pass on a blank input."""
    where = member.weights.name
    try:
        check_budget(member.arch, limits.model, preprocess.size)
    except ModelBudgetError as exc:
        raise (ParamBudget if exc.budget == "parameters" else MemoryBudget)(f"{where}: {exc}") from exc
    model = build_model_meta(member.arch)
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    nbytes = state_dict_bytes(model)
    if nbytes > limits.model.max_state_bytes:
        raise MemoryBudget(
            f"{where}: the state dict needs {nbytes:,} bytes; the budget is {limits.model.max_state_bytes:,}"
        )
    state = read_safetensors_checked(member.weights, expected, limits, member.sha256)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise WeightsMismatch(f"{where}: the weights do not fit the model: {exc}") from exc
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise WeightsMismatch(f"{where}: the weights leave {leftover[:5]} uninitialised")
    model.eval()
    _forward_check(model, preprocess, where)
    return model


def load_compiled_member(
    member: Member, preprocess: PreprocessSpec, limits: VerifyLimits = DEFAULT_LIMITS, threads: int | None = None
) -> C.OnnxMember:
    """One member's compiled model: bytes read once (bounded by the state-dict budget plus 16 MiB of graph),
    sha256 checked against the signed manifest, then parsed, signature-checked and run once (compiled.load_onnx)."""
    if member.compiled is None:
        raise NoCompiledModel(f"{member.weights.name}: the member ships no compiled model")
    path, where = member.compiled.path, member.compiled.path.name
    cap = limits.model.max_state_bytes + 16 * _MIB
    data = _read_capped(path, cap, MemoryBudget, where)
    if hashlib.sha256(data).hexdigest() != member.compiled.sha256:
        raise ChecksumMismatch(f"{where}: sha256 of the bytes loaded does not match bundle.json")
    try:
        return C.load_onnx(
            data, preprocess.channels, preprocess.size, member.arch.num_classes, where=where, threads=threads
        )
    except C.CompiledError as exc:
        raise CompiledModelInvalid(str(exc)) from exc


def read_safetensors_checked(
    path: Path,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    limits: VerifyLimits = DEFAULT_LIMITS,
    sha256: str | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file whose names, shapes and dtypes are exactly `expected`, all finite.

    The file is opened without following links and read once; the header length (8 bytes, little endian) is
    checked against `limits.max_header_bytes` and the file size before the header is read, the data size against
    `expected` before the data is read, and `sha256` (when given) against the bytes actually parsed."""
    where = path.name
    if sys.byteorder != "little":  # pragma: no cover - safetensors data is little endian
        raise NotSafetensors(f"{where}: reading safetensors on a big-endian host is not supported")
    digest = hashlib.sha256()
    with _open_regular(path, where) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(9)
        _check_magic(prefix, where)
        header_len = int.from_bytes(prefix[:8], "little")
        if header_len > limits.max_header_bytes or 8 + header_len > size:
            raise HeaderTooLarge(
                f"{where}: the safetensors header claims {header_len:,} bytes (file {size:,} bytes, limit "
                f"{limits.max_header_bytes:,})"
            )
        header_bytes = prefix[8:] + f.read(header_len - 1)
        digest.update(prefix[:8])
        digest.update(header_bytes)
        spans = _check_header(header_bytes, expected, limits, where)
        data_len = size - 8 - header_len
        need = sum(end - begin for _, _, begin, end in spans)
        if data_len != need:
            raise WeightsMismatch(f"{where}: {data_len:,} bytes of tensor data; the model's tensors take {need:,}")
        data = bytearray(data_len)
        if data_len and f.readinto(data) != data_len:
            raise NotSafetensors(f"{where}: the file is shorter than its header says")
        digest.update(data)
    if sha256 is not None and digest.hexdigest() != sha256:
        raise ChecksumMismatch(f"{where}: sha256 of the bytes loaded does not match bundle.json")
    state: dict[str, torch.Tensor] = {}
    for name, dtype, begin, end in spans:
        shape = expected[name][0]
        raw = torch.frombuffer(data, dtype=torch.uint8, count=end - begin, offset=begin) if end > begin else None
        tensor = torch.empty(shape, dtype=dtype) if raw is None else raw.clone().view(dtype).reshape(shape)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteWeights(f"{where}: tensor {name!r} holds {bad} NaN / infinite value(s)")
        state[name] = tensor
    return state


def _check_magic(prefix: bytes, where: str) -> None:
    if prefix[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"):
        raise NotSafetensors(f"{where}: this is a Python pickle, not safetensors; pickles are never loaded")
    if prefix[:4] == b"PK\x03\x04":
        raise NotSafetensors(f"{where}: this is a zip archive (a torch.save checkpoint?), not safetensors")
    if len(prefix) < 9 or prefix[8:9] != b"{":
        raise NotSafetensors(f"{where}: not a safetensors file (no 8-byte header length followed by a JSON header)")


def _check_header(
    header_bytes: bytes,
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]],
    limits: VerifyLimits,
    where: str,
) -> list[tuple[str, torch.dtype, int, int]]:
    """(name, dtype, begin, end) of every tensor, sorted by offset; contiguous and matching `expected`."""
    try:
        header = _parse_json(header_bytes, min(limits.max_json_depth, _SAFETENSORS_HEADER_DEPTH), "header")
    except BundleError as exc:
        raise NotSafetensors(f"{where}: invalid safetensors header: [{exc.reason}] {exc}") from exc
    if not isinstance(header, dict):
        raise NotSafetensors(f"{where}: the safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise NotSafetensors(f"{where}: safetensors __metadata__ must map strings to strings")
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise WeightsMismatch(
            f"{where}: tensors do not fit the model: missing {missing[:5]} ({len(missing)}), unexpected "
            f"{unexpected[:5]} ({len(unexpected)})"
        )
    spans: list[tuple[str, torch.dtype, int, int]] = []
    wrong: list[str] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise NotSafetensors(f"{where}: tensor {name!r} needs exactly dtype, shape and data_offsets")
        shape, offsets, dtype_name = entry["shape"], entry["data_offsets"], entry["dtype"]
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise NotSafetensors(f"{where}: tensor {name!r}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise NotSafetensors(f"{where}: tensor {name!r}: data_offsets {offsets!r} is not [begin, end]")
        want_shape, want_dtype = expected[name]
        dtype = _SAFETENSORS_DTYPES.get(str(dtype_name))
        if tuple(shape) != want_shape or dtype != want_dtype:
            wrong.append(f"{name}: file {dtype_name} {tuple(shape)} vs model {want_dtype} {want_shape}")
            continue
        assert dtype is not None
        begin, end = int(offsets[0]), int(offsets[1])
        if end - begin != int(np.prod(want_shape, dtype=np.int64)) * dtype.itemsize:
            raise NotSafetensors(f"{where}: tensor {name!r}: data_offsets do not match its shape and dtype")
        spans.append((name, dtype, begin, end))
    if wrong:
        raise WeightsMismatch(f"{where}: tensor shapes / dtypes do not fit the model: {'; '.join(wrong[:5])}")
    spans.sort(key=lambda s: (s[2], s[3]))
    position = 0
    for name, _, begin, end in spans:
        if begin != position:
            raise NotSafetensors(f"{where}: tensor {name!r} does not start where the previous one ends")
        position = end
    return spans


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _forward_check(model: VisionClassifier, preprocess: PreprocessSpec, where: str) -> None:
    x = torch.zeros(1, preprocess.channels, preprocess.size, preprocess.size)
    try:
        with torch.inference_mode():
            out = model(x)
    except Exception as exc:  # any failure of the bundle's own model is the bundle's fault: refuse it by name
        raise ForwardFailed(
            f"{where}: a forward pass on a blank {tuple(x.shape)} input failed: {type(exc).__name__}: {exc}"
        ) from exc
    if tuple(out.shape) != (1, model.spec.num_classes):
        raise ForwardFailed(f"{where}: the model answers {tuple(out.shape)}, not (1, {model.spec.num_classes})")
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteOutput(f"{where}: a forward pass on a blank input gives non-finite logits {out.tolist()}")


# ---------------------------------------------------------------------------------------------- checks


def _scan_layout(root: Path, limits: VerifyLimits) -> dict[str, int]:
    """relative path -> size of every file in the bundle; refuses links, special files and oversized bundles."""
    files: dict[str, int] = {}
    pending: list[tuple[str, str]] = [(str(root), "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            raise Unreadable(f"{prefix or root}: cannot list ({exc.strerror})") from exc
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_symlink():
                raise SymlinkInBundle(
                    f"{rel} is a symbolic link (to {os.readlink(entry.path)!r}); bundles hold no links"
                )
            if entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, rel + "/"))
                continue
            if not entry.is_file(follow_symlinks=False):
                raise SpecialFile(f"{rel} is not a regular file (a fifo, socket or device)")
            files[rel] = entry.stat(follow_symlinks=False).st_size
            if len(files) > limits.max_files:
                raise BundleTooLarge(f"{root}: more than {limits.max_files:,} files")
    total = sum(files.values())
    if total > limits.max_total_bytes:
        raise BundleTooLarge(f"{root}: {total:,} bytes; the limit is {limits.max_total_bytes:,}")
    return files


def _load_manifest(root: Path, limits: VerifyLimits) -> dict[str, object]:
    data = _read_capped(root / BUNDLE_FILE, limits.max_manifest_bytes, ManifestTooLarge, BUNDLE_FILE)
    manifest = _parse_json(data, limits.max_json_depth, BUNDLE_FILE)
    if not isinstance(manifest, dict):
        raise InvalidJson(f"{BUNDLE_FILE}: expected a JSON object")
    return manifest


def _check_signature(
    root: Path, manifest: dict[str, object], present: bool, allow_unsigned: bool, limits: VerifyLimits
) -> tuple[str | None, str]:
    """(signing key id, status); refuses unless the manifest is signed by a trusted key or `allow_unsigned`."""
    if not present:
        if allow_unsigned:
            return None, "unsigned"
        raise Unsigned(
            f"{root}: no {SIGNATURE_FILE}; the bundle is not signed (accept it explicitly with --allow-unsigned)"
        )
    data = _read_capped(root / SIGNATURE_FILE, limits.max_signature_bytes, BadSignature, SIGNATURE_FILE)
    try:
        parsed = signing.parse_signature_file(data)
        trusted = signing.trusted_keys()
    except signing.KeyConfigError as exc:
        raise KeyConfig(f"trusted keys: {exc}") from exc
    except signing.SignatureError as exc:
        raise BadSignature(f"{root}: {exc}") from exc
    try:
        return signing.verify_manifest(manifest, parsed, trusted), "verified"
    except signing.SignatureError as exc:
        if exc.reason == "untrusted_key" and allow_unsigned:
            return parsed.key_id, "untrusted_key"
        raise _SIGNATURE_ERRORS.get(exc.reason, BadSignature)(f"{root}: {exc}") from exc


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


def _check_listing(manifest: dict[str, object], layout: dict[str, int], extra_allowed: frozenset[str]) -> None:
    files = _as_dict(manifest["files"], "files")
    allowed = {*files, *extra_allowed, BUNDLE_FILE, SIGNATURE_FILE}
    unlisted = sorted(rel for rel in layout if rel not in allowed and not rel.startswith(UNLISTED_ANNEX))
    if unlisted:
        raise UnlistedFile(
            f"{len(unlisted)} file(s) in the bundle are not listed in bundle.json 'files': {unlisted[:5]}"
        )


def _check_checksums(root: Path, manifest: dict[str, object]) -> None:
    files = _as_dict(manifest["files"], "files")
    for rel, expected in sorted(files.items()):
        _check_relpath(rel)
        if rel in (BUNDLE_FILE, SIGNATURE_FILE):
            raise ChecksumMismatch(f"files: {rel!r} cannot list itself")
        path = root / rel
        if not path.is_file():
            raise ChecksumMismatch(f"{rel}: listed in bundle.json but missing from the bundle")
        actual = _sha256_regular(path, rel)
        if actual != expected:
            raise ChecksumMismatch(f"{rel}: sha256 {actual[:16]}… does not match bundle.json ({str(expected)[:16]}…)")
    for i, m in enumerate(_as_list(manifest["members"], "members")):
        member = _as_dict(m, "members[]")
        weights = str(member["weights"])
        if weights not in files:
            raise ChecksumMismatch(f"members[{i}].weights={weights!r} has no checksum in bundle.json 'files'")
        if not weights.endswith(".safetensors"):
            raise NotSafetensors(f"members[{i}].weights={weights!r}: weights must be safetensors")
        if member.get("compiled") is not None:
            rel = _compiled_entry(member["compiled"], i)[1]
            if rel not in files:
                raise ChecksumMismatch(f"members[{i}].compiled.file={rel!r} has no checksum in bundle.json 'files'")


def _compiled_entry(value: object, i: int) -> tuple[str, str]:
    """(format, relative file) of a member's ``compiled`` entry; `CompiledModelInvalid` when malformed."""
    if not isinstance(value, dict):
        raise CompiledModelInvalid(f"members[{i}].compiled must be an object; got {type(value).__name__}")
    fmt, rel = value.get("format"), value.get("file")
    if fmt not in C.COMPILED_FORMATS:
        raise CompiledModelInvalid(f"members[{i}].compiled.format={fmt!r} is not one of {C.COMPILED_FORMATS}")
    if not isinstance(rel, str) or not rel.endswith(".onnx"):
        raise CompiledModelInvalid(f"members[{i}].compiled.file={rel!r} must name a .onnx file in the bundle")
    _check_relpath(rel)
    return str(fmt), rel


def _check_relpath(rel: str) -> None:
    parts = rel.split("/")
    if rel.startswith("/") or "\\" in rel or Path(rel).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise ChecksumMismatch(f"files: {rel!r} points outside the bundle (or is not a plain relative path)")


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


def _members(
    root: Path, manifest: dict[str, object], preprocess: PreprocessSpec, limits: VerifyLimits
) -> tuple[Member, ...]:
    out = []
    task = _as_dict(manifest["task"], "task")
    files = _as_dict(manifest["files"], "files")
    for i, m in enumerate(_as_list(manifest["members"], "members")):
        member = _as_dict(m, f"members[{i}]")
        try:
            arch = ArchSpec.from_dict(_as_dict(member["architecture"], f"members[{i}].architecture"))
        except (ArchSpecError, ValueError, TypeError) as exc:
            raise InvalidArchitecture(f"members[{i}].architecture: {exc}") from exc
        if arch.num_classes != len(_as_list(task["classes"], "task.classes")):
            raise InvalidArchitecture(f"members[{i}]: {arch.num_classes} outputs but the task has other class count")
        try:
            check_budget(arch, limits.model, preprocess.size)
        except ModelBudgetError as exc:
            raise (ParamBudget if exc.budget == "parameters" else MemoryBudget)(f"members[{i}]: {exc}") from exc
        rel = str(member["weights"])
        compiled = None
        if member.get("compiled") is not None:
            fmt, compiled_rel = _compiled_entry(member["compiled"], i)
            compiled = CompiledFile(fmt, root / compiled_rel, str(files[compiled_rel]))
        out.append(Member(arch=arch, weights=root / rel, sha256=str(files[rel]), compiled=compiled))
    return tuple(out)


# --------------------------------------------------------------------------------------------- helpers

_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def json_depth(text: str) -> int:
    """The deepest nesting of arrays / objects in JSON `text`, measured without parsing (no recursion)."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _parse_json(data: bytes, max_depth: int, where: str) -> object:
    """Strict JSON: UTF-8, nesting at most `max_depth` (checked before parsing), no duplicate keys."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidUtf8(f"{where}: not valid UTF-8 (byte {exc.start}: {exc.reason})") from exc
    depth = json_depth(text)
    if depth > max_depth:
        raise JsonTooDeep(f"{where}: JSON nested {depth} levels deep; the limit is {max_depth}")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError as exc:  # pragma: no cover - the depth check comes first
        raise JsonTooDeep(f"{where}: JSON nested too deeply") from exc
    except ValueError as exc:  # json.JSONDecodeError, duplicate keys, over-long integers
        raise InvalidJson(f"{where}: not valid JSON ({exc})") from exc


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _open_regular(path: Path, where: str) -> io.BufferedReader:
    """Open a regular file for reading without following a symbolic link."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError as exc:
        raise ChecksumMismatch(f"{where}: missing from the bundle") from exc
    except OSError as exc:
        raise Unreadable(f"{where}: cannot open ({exc.strerror}; links are refused)") from exc
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise SpecialFile(f"{where} is not a regular file")
    return f


def _read_capped(path: Path, cap: int, too_large: type[BundleError], where: str) -> bytes:
    with _open_regular(path, where) as f:
        size = os.fstat(f.fileno()).st_size
        if size > cap:
            raise too_large(f"{where}: {size:,} bytes; the limit is {cap:,}")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise too_large(f"{where}: more than {cap:,} bytes; the limit is {cap:,}")
    return data


def _sha256_regular(path: Path, where: str) -> str:
    h = hashlib.sha256()
    with _open_regular(path, where) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _softmax(log_probs: FloatArray) -> FloatArray:
    z = log_probs - log_probs.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: FloatArray = e / e.sum(axis=1, keepdims=True)
    return out


def _write_bytes(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


def _write_json_file(path: Path, payload: object) -> None:
    _write_bytes(path, (json.dumps(payload, sort_keys=True, indent=1) + "\n").encode("utf-8"))


def _as_dict(value: object, where: str) -> dict[str, object]:
    if not isinstance(value, dict):
        raise MissingField(f"bundle.json: {where} must be an object")
    return value


def _as_list(value: object, where: str) -> list[object]:
    if not isinstance(value, list):
        raise MissingField(f"bundle.json: {where} must be a list")
    return value
