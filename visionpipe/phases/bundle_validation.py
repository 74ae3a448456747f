"""Phase 6, bundle_validation: assemble the candidate bundle and check it before anything is published.

The candidate is assembled from the trained model, the decision phases' outputs and the Dataset, written
through `visionpipe.serving.bundle.write_bundle`, then checked:

  bundle_verifies   reload through `visionpipe.serving.bundle.read_bundle`: schema, fields, checksums, preprocessing
                    signature, calibrator and policy consistency
  drift_reference   the reloaded bundle's answers on val_test (calibrated confidence, score, decisions) and the
                    val_test images' statistics and embedding are stored as `drift_reference.json`
                    (visionpipe/monitoring/drift.py); the bundle is re-signed listing it (`reseal_bundle`) and must
                    verify again, so the reference is covered by the signature like every other file
  split_contract    val_test shares no image with train / val_select / val_calib, and the model was trained and
                    selected on this Dataset's train / val_select splits (fingerprints)
  parity            the reloaded bundle, fed val_test (and val_calib) images through serving's preprocessing,
                    reproduces the training-side probabilities and the decisions, image for image (labels,
                    abstentions, the policy used and the prediction sets; see "Decision parity" below), and so the
                    metrics the bundle reports
  compiled_export   optional (`compiled_runtime="onnx"`): the model exported to ONNX (visionpipe/serving/compiled.py)
                    as ``compiled/member-0.onnx``, listed in bundle.json with its sha256 and signed with the bundle;
                    an architecture that does not export fails this check with the exporter's reason
  compiled_parity   with a compiled model: the bundle run by ONNX Runtime (`BundleModel(runtime="onnx")`) decides
                    every val_calib and val_test image exactly as the torch model does (same decision rule as
                    parity); max |Δp| (raw and calibrated) is reported and must stay <= 1e-4
  quality gates     min accuracy, min MCC (binary), max ECE on val_test
  champion          optional: not worse than the champion bundle by more than a margin on the same val_test
  threshold_at_half optional (`threshold_at_half=True`, binary tasks): the bundle is assembled with a calibrator
                    whose positive probability is remapped so the chosen calibrated threshold lands on 0.5 and a
                    threshold policy at 0.5; this check shows its decisions on val_calib and val_test equal those
                    of the fitted calibrator with the sweep's threshold, image for image

The bundle checked (and signed) here is the one export publishes, unchanged, threshold_at_half included: every
check above, the quality gates too, applies to the bundle as served ("served = validated", docs/DESIGN.md).

Every failed check is named in the report; the step then fails and the candidate's bundle.json is removed,
so a failed candidate can never be loaded.

Decision parity (`compare_decisions`, used by both parity checks): two paths agree on an image when its label
(abstention included), the policy that decided it (hybrid active / fallback) and its prediction-set mask are equal.
One tolerance, for randomized APS only: its per-image u is a hash of the top-3 log-probabilities rounded to a
1/64-nat grid (visionpipe/serving/policies.py `aps_u`), so float noise of ~1e-7 between two paths moves a
log-probability across a grid midpoint for about 0.01 % of images and changes u, hence possibly the set. Such an
image (sets differ AND the two paths' u differ, in a space an ``aps`` set is computed in, labels and policy equal)
is a "u flip": tolerated and counted in the report, up to `U_FLIP_SHARE` of the split (at least one image); more
than that, or any set difference with the same u, or any label / abstention / policy difference, is refused. A u
flip cannot change a decided label or an abstention, only the attached set of one image, and both sets are sets of
the same conformal rule (u is a fixed function of the image either way, so coverage holds for each path).
"""

import datetime as dt
import json
import math
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.metrics import matthews_corrcoef

from visionpipe.data.datasets import Dataset as LoadedDataset
from visionpipe.data.datasets import load_dataset
from visionpipe.serving import compiled as C
from visionpipe.serving import metrics as M
from visionpipe.serving.bundle import (
    BUNDLE_FILE,
    BundleError,
    BundleModel,
    Member,
    Prediction,
    load_member,
    read_bundle,
    reseal_bundle,
    write_bundle,
)
from visionpipe.serving.policies import ABSTAIN, DecisionPolicy, HybridPolicy, aps_u

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

COMPILED_DIR = "compiled"
COMPILED_MEMBER = f"{COMPILED_DIR}/member-0.onnx"
U_FLIP_SHARE = 0.001  # tolerated share of a split's images whose set differs only through an APS u flip (>= 1)
PROB_TOLERANCE = 1e-4  # max |Δp| between two paths (served vs training-side, compiled vs torch)


class ValidationFailed(RuntimeError):
    """The candidate failed one or more checks; the message names every failed check."""


class ThresholdAtHalfError(ValueError):
    """threshold_at_half was asked of a bundle it cannot apply to (not binary, or no calibrated threshold)."""


@dataclass(frozen=True)
class Gates:
    """Quality gates on val_test; a negative value switches a gate off."""

    min_accuracy: float = -1.0
    min_mcc: float = -1.0
    max_ece: float = -1.0
    champion_uri: str = ""
    champion_margin: float = 0.0

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "max_ece"):
            value = getattr(self, name)
            if value > 1.0:
                raise ValueError(f"{name}={value} must be <= 1 (or negative to switch the gate off)")
        if self.min_mcc > 1.0:
            raise ValueError(f"min_mcc={self.min_mcc} must be <= 1 (or below -1 to switch the gate off)")
        if self.champion_margin < 0:
            raise ValueError(f"champion_margin={self.champion_margin} must be >= 0")


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class ValidationResult:
    bundle_dir: Path
    checks: list[Check] = field(default_factory=list)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    report_markdown: str = ""

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]


# --------------------------------------------------------------------------------------------------- core


def run(
    dataset_dir: Path,
    model_dir: Path,
    logits_dir: Path,
    calibration_dir: Path,
    out_dir: Path,
    threshold_dir: Path | None = None,
    gates: Gates = Gates(),
    name: str = "visionpipe-model",
    description: str = "",
    submitter: str = "",
    parent_bundle: str = "",
    threshold_at_half: bool = False,
    compiled_runtime: str = "none",
) -> ValidationResult:
    """Assemble the candidate bundle in `out_dir`, run every check, and fail (ValidationFailed) if any fails.

    threshold_at_half: assemble the binary bundle whose threshold sits at 0.5 (see the module docstring) instead;
    ThresholdAtHalfError, before anything is written, when the task is not binary or the threshold is raw.
    compiled_runtime: ``none`` (default) or ``onnx``: also ship the model exported to ONNX, checked for decision
    parity with torch (checks compiled_export, compiled_parity_*). Off by default because the export costs
    tens of seconds of CPU per member (torch.export + onnxscript; docs/throughput.md section 2)."""
    if compiled_runtime not in C.COMPILED_RUNTIMES:
        raise ValueError(
            f"compiled_runtime={compiled_runtime!r} is not one of {C.COMPILED_RUNTIMES} (onnx: also ship the model "
            "exported to ONNX for --runtime onnx)"
        )
    dataset = load_dataset(dataset_dir)
    model_info = _read_json(model_dir / "model.json")
    fitted = _read_json(calibration_dir / "calibration.json")
    threshold = _read_json(threshold_dir / "threshold.json") if threshold_dir else {}
    logits = {s: _load_npz(logits_dir / f"{s}.npz") for s in ("val_calib", "val_test")}

    calibration, half_threshold = (
        at_half_calibration(fitted, dataset.classes, dataset.positive_class) if threshold_at_half else (fitted, None)
    )
    reported = reported_metrics(calibration, logits)
    manifest = assemble_manifest(dataset, model_info, calibration, threshold, reported, name, parent_bundle)
    if half_threshold is not None:
        manifest["threshold_at_half"] = {"threshold": half_threshold, "base_version": manifest["version"]}
        manifest["version"] = f"{manifest['version']}-half"
    card = {
        "name": name,
        "description": description or f"{name}: {len(dataset.classes)}-class image classifier",
        "version": manifest["version"],
        "submitted": manifest["created"],
        "submitter": submitter or None,
    }
    (out_dir / BUNDLE_FILE).unlink(missing_ok=True)  # an earlier attempt's bundle is incomplete from here on
    shutil.rmtree(out_dir / COMPILED_DIR, ignore_errors=True)  # and nothing stale from it is shipped
    export_check: Check | None = None
    extra: dict[str, Path] = {}
    if compiled_runtime == "onnx":
        export_check, entry = export_compiled(model_dir, model_info, out_dir, COMPILED_MEMBER)
        if entry is not None:
            members = manifest["members"]
            assert isinstance(members, list) and isinstance(members[0], dict)
            members[0]["compiled"] = entry
            extra[COMPILED_MEMBER] = out_dir / COMPILED_MEMBER
    write_bundle(out_dir, manifest, [model_dir / "model.safetensors"], card, extra_files=extra)

    result = ValidationResult(bundle_dir=out_dir, metrics=reported)
    bundle_check, runtime = _check_bundle_verifies(out_dir)
    result.checks.append(bundle_check)
    if export_check is not None:
        result.checks.append(export_check)
    if runtime is not None:
        result.checks.append(attach_drift_reference(out_dir, runtime, dataset))
    result.checks.append(check_split_contract(dataset, model_info))
    if runtime is not None:
        served = served_predictions(runtime, dataset)
        result.checks.extend(check_parity(runtime, dataset, logits, reported, served))
        if extra:
            result.checks.extend(check_compiled_parity(runtime, dataset, served))
        result.checks.extend(check_gates(reported["val_test"], gates, dataset.positive_index is not None))
        if gates.champion_uri:
            result.checks.append(check_champion(runtime, dataset, gates))
        if half_threshold is not None:
            result.checks.append(check_threshold_at_half(runtime, fitted, logits))
    result.report_markdown = render_report(result, manifest)
    (out_dir / "reports").mkdir(exist_ok=True)
    (out_dir / "reports" / "validation.md").write_text(result.report_markdown)
    if not result.passed:
        (out_dir / BUNDLE_FILE).unlink(missing_ok=True)  # fail closed: a failed candidate cannot be loaded
        names = ", ".join(f"{c.name} ({c.detail})" for c in result.failed)
        raise ValidationFailed(f"bundle validation failed: {names}\n\n{result.report_markdown}")
    return result


def assemble_manifest(
    dataset: LoadedDataset,
    model_info: dict[str, object],
    calibration: dict[str, object],
    threshold: dict[str, object],
    reported: dict[str, dict[str, float]],
    name: str,
    parent_bundle: str,
) -> dict[str, object]:
    """The bundle.json fields (all but `files` and the weights paths, which write_bundle fills in)."""
    preprocess = _as_dict(model_info["preprocess"])
    arch = _as_dict(model_info["arch"])
    from visionpipe.specs import PreprocessSpec

    spec = PreprocessSpec.from_dict(preprocess)
    created = dt.datetime.now(dt.UTC).replace(microsecond=0)
    recipe_hash = str(model_info.get("recipe_hash", ""))
    dataset_meta = _read_json(dataset.path / "dataset.json")
    return {
        "name": name,
        "version": created.strftime("%Y%m%d-%H%M%S") + "-" + recipe_hash[:8],
        "created": created.isoformat().replace("+00:00", "Z"),
        "task": {
            "classes": list(dataset.classes),
            "positive_class": dataset.positive_class,
            "input_size": spec.size,
            "channels": spec.channels,
        },
        "members": [{"architecture": arch}],
        "preprocessing": {"spec": spec.to_dict(), "signature": spec.signature},
        "calibrator": calibration["calibrator"],
        "policy": calibration["policy"],
        "metrics": reported,
        "decision": {
            "threshold_sweep": {k: threshold[k] for k in sorted(threshold) if k not in ("curve",)},
            "calibration_selection": calibration.get("selection", {}),
            # how supervised_train resolved the recipe's views on val_select (aggregate auto / learned), if it did
            **({"views_selection": model_info["views_selection"]} if model_info.get("views_selection") else {}),
        },
        "provenance": {
            "recipe": model_info.get("recipe", {}),
            "recipe_hash": recipe_hash,
            "best_epoch": model_info.get("best_epoch"),
            "data_source": dataset_meta.get("source"),
            "data_fingerprint": dataset_meta.get("fingerprint"),
            "split_fingerprints": dict(dataset.split_fingerprints),
            "split_usage": {"fit": "train", "select": "val_select", "calibrate": "val_calib", "report": "val_test"},
            "code_version": code_version(),
            "parent_bundle": parent_bundle or None,
        },
    }


def reported_metrics(
    calibration: dict[str, object], logits: dict[str, tuple[FloatArray, IntArray]]
) -> dict[str, dict[str, float]]:
    """Metrics per split from the training-side logits, decided by the very calibrator and policy served."""
    from visionpipe.serving.calibrators import calibrator_from_dict
    from visionpipe.serving.policies import apply_policy, policy_from_dict

    calibrator = calibrator_from_dict(_as_dict(calibration["calibrator"]))
    policy = policy_from_dict(_as_dict(calibration["policy"]))
    out = {}
    for split, (z, y) in logits.items():
        log_probs = M.log_softmax(z)
        raw = M.softmax(z)
        calibrated = np.asarray(calibrator.probabilities(log_probs), dtype=np.float64)
        decisions = apply_policy(policy, calibrated, raw)
        out[split] = split_metrics(Prediction(raw, calibrated, decisions), y)
    return out


def split_metrics(prediction: Prediction, labels: IntArray) -> dict[str, float]:
    """accuracy / MCC / coverage of the decisions and calibration quality of the calibrated probabilities."""
    decided = prediction.decisions.labels
    kept = decided != ABSTAIN
    report = M.calibration_report(prediction.calibrated_probs, labels)
    return {
        "n": float(len(labels)),
        "accuracy": M.accuracy(prediction.calibrated_probs, labels),
        "coverage": float(kept.mean()) if len(kept) else 0.0,
        "selective_accuracy": float((decided[kept] == labels[kept]).mean()) if kept.any() else 0.0,
        "mcc": float(matthews_corrcoef(labels[kept], decided[kept])) if kept.sum() > 1 else 0.0,
        **{k: float(v) for k, v in report.items()},
    }


# -------------------------------------------------------------------------------------------------- checks


def _check_bundle_verifies(out_dir: Path) -> tuple[Check, BundleModel | None]:
    try:
        bundle = read_bundle(out_dir)
        runtime = BundleModel(bundle)
    except BundleError as exc:
        return Check("bundle_verifies", False, f"[{exc.reason}] {exc}"), None
    detail = f"schema, fields, {len(_as_dict(bundle.manifest['files']))} checksums, signature, policy"
    return Check("bundle_verifies", True, detail), runtime


def attach_drift_reference(out_dir: Path, runtime: BundleModel, dataset: LoadedDataset, seed: int = 0) -> Check:
    """Build the drift reference from val_test with the reloaded (served) bundle, add it to the bundle (re-signed)
    and verify the bundle again."""
    from visionpipe.monitoring.drift import MAX_REFERENCE, REFERENCE_FILE, DriftError, build_reference

    data = dataset.split("val_test", "evaluate")
    images = data.images
    if len(images) > MAX_REFERENCE:  # the same seeded subsample build_reference would take, predicted only once
        keep = np.sort(np.random.default_rng(seed).choice(len(images), size=MAX_REFERENCE, replace=False))
        images = images[keep]
    try:
        served = runtime.predict_images(images)
        bundle = runtime.bundle
        reference = build_reference(
            images,
            served.calibrated_probs,
            served.decisions.labels,
            classes=bundle.classes,
            positive_class=bundle.positive_class,
            preprocessing=bundle.preprocess,
            bundle_version=bundle.version,
            source="val_test",
            seed=seed,
        )
        text = reference.to_json()
        (out_dir / REFERENCE_FILE).write_text(text, encoding="utf-8")
        reseal_bundle(out_dir, add=[REFERENCE_FILE])
        reread = read_bundle(out_dir)
    except (DriftError, BundleError) as exc:
        (out_dir / REFERENCE_FILE).unlink(missing_ok=True)
        return Check("drift_reference", False, f"{type(exc).__name__}: {exc}")
    if reread.drift_reference is None:
        return Check("drift_reference", False, f"{REFERENCE_FILE} is not listed in the re-signed bundle.json")
    return Check(
        "drift_reference",
        True,
        f"{reference.size} val_test images, {len(text.encode()):,} bytes, listed and signed; bundle verifies",
    )


def check_split_contract(dataset: LoadedDataset, model_info: dict[str, object]) -> Check:
    """val_test disjoint from every other split; the model trained / selected on this Dataset's splits."""
    problems = []
    test = dataset.split_hashes("val_test")
    for other in ("train", "val_select", "val_calib"):
        shared = test & dataset.split_hashes(other)
        if shared:
            problems.append(f"val_test shares {len(shared)} image(s) with {other}")
    trained_on = _as_dict(model_info.get("split_fingerprints", {}))
    for split in ("train", "val_select"):
        recorded = trained_on.get(split)
        if recorded is None:
            problems.append(f"the model records no {split} fingerprint")
        elif recorded != dataset.split_fingerprints[split]:
            problems.append(f"the model's {split} fingerprint differs from this Dataset's {split}")
        if recorded is not None and recorded == dataset.split_fingerprints["val_test"]:
            problems.append(f"the model used val_test as {split}")
    if problems:
        return Check("split_contract", False, "; ".join(problems))
    return Check("split_contract", True, "val_test disjoint from train / val_select / val_calib; fingerprints match")


PARITY_SPLITS = ("val_calib", "val_test")


def served_predictions(runtime: BundleModel, dataset: LoadedDataset) -> dict[str, Prediction]:
    """The reloaded bundle's predictions on val_calib and val_test images (computed once, read by the parity
    checks)."""
    return {split: runtime.predict_images(dataset.split(split, "evaluate").images) for split in PARITY_SPLITS}


def check_parity(
    runtime: BundleModel,
    dataset: LoadedDataset,
    logits: dict[str, tuple[FloatArray, IntArray]],
    reported: dict[str, dict[str, float]],
    served: dict[str, Prediction] | None = None,
) -> list[Check]:
    """The served path reproduces the training-side probabilities, decisions (labels, abstentions, policy used,
    prediction sets: `compare_decisions`) and metrics."""
    served = served or served_predictions(runtime, dataset)
    checks = []
    for split in PARITY_SPLITS:
        data = dataset.split(split, "evaluate")
        z, y = logits[split]
        problems = []
        if not np.array_equal(y, data.labels):
            problems.append("labels differ from the Dataset's")
        expected = runtime.decide(M.log_softmax(z))
        diff = compare_decisions(served[split], expected, runtime.bundle.policy)
        problems += diff.problems("served", "training-side logits")
        served_metrics = split_metrics(served[split], data.labels)
        for key in ("accuracy", "coverage", "mcc"):
            if abs(served_metrics[key] - reported[split][key]) > 1e-9:
                problems.append(f"{key} {served_metrics[key]:.6f} != reported {reported[split][key]:.6f}")
        detail = f"{split}: " + "; ".join(problems) if problems else diff.summary()
        checks.append(Check(f"parity_{split}", not problems, detail))
    return checks


def export_compiled(
    model_dir: Path, model_info: dict[str, object], out_dir: Path, rel: str
) -> tuple[Check, dict[str, object] | None]:
    """Export the trained model (loaded through serving's checked loader) to ONNX at `out_dir` / `rel`: the check,
    and the member's ``compiled`` manifest entry (None when the export failed)."""
    path = out_dir / rel
    from visionpipe.specs import ArchSpec, PreprocessSpec

    try:
        arch = ArchSpec.from_dict(_as_dict(model_info["arch"]))
        spec = PreprocessSpec.from_dict(_as_dict(model_info["preprocess"]))
        model = load_member(Member(arch=arch, weights=model_dir / "model.safetensors"), spec)
    except (BundleError, ValueError) as exc:
        return Check("compiled_export", False, f"the trained model does not load: {exc}"), None
    start = time.perf_counter()
    try:
        exported = C.export_onnx(model, spec.channels, spec.size, arch.num_classes, path)
    except C.CompiledError as exc:
        return Check("compiled_export", False, str(exc)), None
    seconds = time.perf_counter() - start
    detail = (
        f"{arch.name} -> {rel} (ONNX opset {exported.opset}, {path.stat().st_size:,} bytes, {seconds:.1f} s; ONNX "
        f"Runtime vs torch on the export's round trip: max relative |Δlogit| {exported.round_trip_max_diff:.1e})"
    )
    return Check("compiled_export", True, detail), exported.manifest_entry(rel)


def check_compiled_parity(
    runtime: BundleModel, dataset: LoadedDataset, served: dict[str, Prediction] | None = None
) -> list[Check]:
    """The bundle run by ONNX Runtime decides every val_calib and val_test image as the torch model does
    (`compare_decisions`), probabilities within `PROB_TOLERANCE`; a bundle whose compiled model disagrees fails
    with the split, the count, the first indices and max |Δp|."""
    try:
        compiled = BundleModel(runtime.bundle, runtime="onnx")
    except BundleError as exc:
        return [Check("compiled_loads", False, f"[{exc.reason}] {exc}")]
    served = served or served_predictions(runtime, dataset)
    checks = []
    for split in PARITY_SPLITS:
        got = compiled.predict_images(dataset.split(split, "evaluate").images)
        diff = compare_decisions(got, served[split], runtime.bundle.policy)
        problems = diff.problems("compiled (onnx)", "torch")
        detail = f"{split}: " + "; ".join(problems) if problems else diff.summary()
        checks.append(Check(f"compiled_parity_{split}", not problems, detail))
    return checks


@dataclass(frozen=True)
class DecisionDiff:
    """Where two predictions of the same images differ (row indices), and max |Δp| (raw and calibrated)."""

    n: int
    labels: IntArray
    abstentions: IntArray
    policies: IntArray
    sets: IntArray  # set masks differ, not a tolerated u flip
    u_flips: IntArray  # set masks differ only through an APS u flip (labels and policy equal, u differs)
    max_dp: float

    @property
    def allowed_u_flips(self) -> int:
        return max(1, math.floor(U_FLIP_SHARE * self.n))

    def problems(self, ours: str, theirs: str) -> list[str]:
        out = []
        for what, rows in (
            ("labels", self.labels),
            ("abstain decisions", self.abstentions),
            ("deciding policies", self.policies),
            ("prediction sets (not an APS u flip)", self.sets),
        ):
            if len(rows):
                out.append(
                    f"{what} of {ours} differ from {theirs} on {len(rows)} of {self.n} images (first: "
                    f"{rows[:5].tolist()})"
                )
        if len(self.u_flips) > self.allowed_u_flips:
            out.append(
                f"prediction sets differ through an APS u flip on {len(self.u_flips)} of {self.n} images, more than "
                f"the {self.allowed_u_flips} tolerated (first: {self.u_flips[:5].tolist()})"
            )
        if self.max_dp > PROB_TOLERANCE:
            out.append(f"probabilities differ by up to {self.max_dp:.2e} (tolerance {PROB_TOLERANCE:g})")
        if out:
            out.append(f"max |Δp| {self.max_dp:.2e}")
        return out

    def summary(self) -> str:
        flips = f", {len(self.u_flips)} APS u flip(s) tolerated" if len(self.u_flips) else ""
        return (
            f"{self.n} images: labels, abstentions, policies and prediction sets identical{flips}; "
            f"max |Δp| {self.max_dp:.1e}"
        )


def compare_decisions(a: Prediction, b: Prediction, policy: DecisionPolicy) -> DecisionDiff:
    """Compare two predictions of the same images decision by decision (the rule in the module docstring)."""
    da, db = a.decisions, b.decisions
    n = len(da.labels)
    labels = np.flatnonzero(da.labels != db.labels)
    abstentions = np.flatnonzero(da.abstained != db.abstained)
    policies = np.flatnonzero(np.asarray(da.policy_names) != np.asarray(db.policy_names))
    differing = np.flatnonzero((da.set_mask != db.set_mask).any(axis=1)) if n else np.zeros(0, dtype=np.int64)
    same_decision = np.ones(n, dtype=bool)
    same_decision[labels] = False
    same_decision[policies] = False
    flipped = np.zeros(len(differing), dtype=bool)
    for space in aps_spaces(policy):
        pa, pb = (a.calibrated_probs, b.calibrated_probs) if space == "calibrated" else (a.raw_probs, b.raw_probs)
        if len(differing):
            flipped |= aps_u(pa[differing]) != aps_u(pb[differing])
    tolerated = flipped & same_decision[differing]
    max_dp = 0.0
    if n:
        max_dp = float(
            max(np.max(np.abs(a.raw_probs - b.raw_probs)), np.max(np.abs(a.calibrated_probs - b.calibrated_probs)))
        )
    return DecisionDiff(
        n=n,
        labels=labels.astype(np.int64),
        abstentions=abstentions.astype(np.int64),
        policies=policies.astype(np.int64),
        sets=differing[~tolerated].astype(np.int64),
        u_flips=differing[tolerated].astype(np.int64),
        max_dp=max_dp,
    )


def aps_spaces(policy: DecisionPolicy) -> set[str]:
    """The probability spaces in which a randomized ``aps`` set (the only set that reads u) is computed."""
    configs = [policy.conformal]
    if isinstance(policy, HybridPolicy):
        configs += [sub.conformal for sub in policy.policies.values()]
    return {c.space for c in configs if c is not None and c.method == "aps"}


def check_gates(test_metrics: dict[str, float], gates: Gates, binary: bool) -> list[Check]:
    rules: list[tuple[str, float, Callable[[float, float], bool], str, bool]] = [
        ("accuracy", gates.min_accuracy, lambda v, g: v >= g, ">=", gates.min_accuracy >= 0),
        ("mcc", gates.min_mcc, lambda v, g: v >= g, ">=", binary and gates.min_mcc >= -1),
        ("ece", gates.max_ece, lambda v, g: v <= g, "<=", gates.max_ece >= 0),
    ]
    checks = []
    for metric, gate, passes, op, active in rules:
        if active:
            value = test_metrics[metric]
            ok = passes(value, gate)
            checks.append(Check(f"gate_{metric}", ok, f"val_test {metric} {value:.4f} (gate {op} {gate:g})"))
    return checks


def check_champion(runtime: BundleModel, dataset: LoadedDataset, gates: Gates) -> Check:
    """The candidate must not lose to the champion by more than the margin on this val_test."""
    try:
        champion = BundleModel(read_bundle(gates.champion_uri))
    except (BundleError, OSError) as exc:
        return Check("champion", False, f"champion {gates.champion_uri} cannot be loaded: {exc}")
    if champion.bundle.classes != tuple(dataset.classes):
        return Check("champion", False, f"champion classes {champion.bundle.classes} differ from the Dataset's")
    data = dataset.split("val_test", "evaluate")
    metric = "mcc" if dataset.positive_index is not None else "accuracy"
    cand = split_metrics(runtime.predict_images(data.images), data.labels)[metric]
    champ = split_metrics(champion.predict_images(data.images), data.labels)[metric]
    ok = cand >= champ - gates.champion_margin
    verdict = "not worse" if ok else "worse"
    return Check(
        "champion",
        ok,
        f"val_test {metric}: candidate {cand:.4f} vs champion {champ:.4f} "
        f"({verdict} than champion - margin {gates.champion_margin:g})",
    )


def check_threshold_at_half(
    runtime: BundleModel, fitted: dict[str, object], logits: dict[str, tuple[FloatArray, IntArray]]
) -> Check:
    """The bundle's decisions (threshold at 0.5 on the remapped probability) equal those of the fitted calibrator
    with the sweep's calibrated threshold, on every val_calib and val_test image."""
    from visionpipe.serving.calibrators import calibrator_from_dict
    from visionpipe.serving.policies import ThresholdPolicy, apply_policy

    base = calibrator_from_dict(_as_dict(fitted["calibrator"]))
    threshold = calibrated_threshold(_as_dict(fitted["policy"]))
    policy = ThresholdPolicy(threshold, "calibrated", "binary", base.positive_index)
    problems = []
    for split, (z, _y) in logits.items():
        log_probs = M.log_softmax(z)
        expected = apply_policy(policy, base.probabilities(log_probs), M.softmax(z)).labels
        mismatched = int(np.sum(runtime.decide(log_probs).decisions.labels != expected))
        if mismatched:
            problems.append(f"{split}: {mismatched} decision(s) differ from threshold {threshold:.6g}")
    detail = "; ".join(problems) or f"decisions identical to the calibrated threshold {threshold:.6g}, 0.5 served"
    return Check("threshold_at_half", not problems, detail)


# ------------------------------------------------------------------------------------------- threshold_at_half
def at_half_calibration(
    calibration: dict[str, object], classes: tuple[str, ...] | list[str], positive_class: str | None
) -> tuple[dict[str, object], float]:
    """calibration.json's content with the calibrator remapped so the calibrated threshold lands on 0.5 and a
    threshold policy at 0.5 (same decisions), and that threshold."""
    from visionpipe.serving.calibrators import ThresholdAtHalfCalibrator, calibrator_from_dict
    from visionpipe.serving.policies import ThresholdPolicy

    if positive_class is None or len(classes) != 2:
        raise ThresholdAtHalfError("threshold_at_half needs a binary bundle (two classes and a positive class)")
    threshold = calibrated_threshold(_as_dict(calibration["policy"]))
    base = calibrator_from_dict(_as_dict(calibration["calibrator"]))
    calibrator = ThresholdAtHalfCalibrator(2, list(classes).index(positive_class), base, threshold)
    policy = ThresholdPolicy(0.5, "calibrated", "binary", calibrator.positive_index)
    return {**calibration, "calibrator": calibrator.to_dict(), "policy": policy.to_dict()}, threshold


def calibrated_threshold(policy: dict[str, object]) -> float:
    """The binary decision threshold of a policy (a threshold policy, or a hybrid's threshold sub-policy)."""
    candidates = [policy]
    subs = policy.get("policies")
    if isinstance(subs, dict):
        active = subs.get(str(policy.get("active")))
        candidates = [p for p in (active, *subs.values()) if isinstance(p, dict)]
    for p in candidates:
        if p.get("kind") == "threshold" and p.get("task") == "binary":
            if p.get("space") != "calibrated":
                raise ThresholdAtHalfError(
                    "threshold_at_half needs the threshold in the calibrated probability space; this bundle's is "
                    f"{p.get('space')!r} (the calibration kept it raw, e.g. isotonic); calibrate with temperature, "
                    "platt or beta"
                )
            return float(str(p["threshold"]))
    raise ThresholdAtHalfError("threshold_at_half needs a binary threshold policy; the bundle has none")


# ------------------------------------------------------------------------------------------------- report


def render_report(result: ValidationResult, manifest: dict[str, object]) -> str:
    status = "PASSED" if result.passed else "FAILED"
    lines = [
        f"## Bundle validation: {status}",
        "",
        f"Candidate `{manifest['name']}` version `{manifest['version']}`.",
        "",
        "| check | result | detail |",
        "|---|---|---|",
    ]
    lines += [f"| {c.name} | {'pass' if c.ok else '**FAIL**'} | {c.detail} |" for c in result.checks]
    lines += ["", "| split | accuracy | MCC | coverage | ECE | NLL | Brier |", "|---|---:|---:|---:|---:|---:|---:|"]
    for split, m in result.metrics.items():
        cells = [m.get(k, float("nan")) for k in ("accuracy", "mcc", "coverage", "ece", "nll", "brier")]
        lines.append(f"| {split} | " + " | ".join(f"{v:.4f}" for v in cells) + " |")
    return "\n".join(lines) + "\n"


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        base = f"visionpipe {version('visionpipe')}"
    except PackageNotFoundError:
        base = "visionpipe (not installed)"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{base} ({sha})" if sha else base


def _load_npz(path: Path) -> tuple[FloatArray, IntArray]:
    with np.load(path) as data:
        return np.asarray(data["logits"], dtype=np.float64), np.asarray(data["labels"], dtype=np.int64)


def _read_json(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _as_dict(value: object) -> dict[str, object]:
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object, got {type(value).__name__}")
    return value
