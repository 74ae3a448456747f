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
                    reproduces the training-side probabilities and the decisions, image for image, and so the
                    metrics the bundle reports
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
"""

import datetime as dt
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.metrics import matthews_corrcoef

from visionpipe.data.datasets import Dataset as LoadedDataset
from visionpipe.data.datasets import load_dataset
from visionpipe.serving import metrics as M
from visionpipe.serving.bundle import (
    BUNDLE_FILE,
    BundleError,
    BundleModel,
    Prediction,
    read_bundle,
    reseal_bundle,
    write_bundle,
)
from visionpipe.serving.policies import ABSTAIN

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


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
) -> ValidationResult:
    """Assemble the candidate bundle in `out_dir`, run every check, and fail (ValidationFailed) if any fails.

    threshold_at_half: assemble the binary bundle whose threshold sits at 0.5 (see the module docstring) instead;
    ThresholdAtHalfError, before anything is written, when the task is not binary or the threshold is raw."""
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
    write_bundle(out_dir, manifest, [model_dir / "model.safetensors"], card)

    result = ValidationResult(bundle_dir=out_dir, metrics=reported)
    bundle_check, runtime = _check_bundle_verifies(out_dir)
    result.checks.append(bundle_check)
    if runtime is not None:
        result.checks.append(attach_drift_reference(out_dir, runtime, dataset))
    result.checks.append(check_split_contract(dataset, model_info))
    if runtime is not None:
        result.checks.extend(check_parity(runtime, dataset, logits, reported))
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


def check_parity(
    runtime: BundleModel,
    dataset: LoadedDataset,
    logits: dict[str, tuple[FloatArray, IntArray]],
    reported: dict[str, dict[str, float]],
) -> list[Check]:
    """The served path reproduces the training-side probabilities, decisions and metrics."""
    checks = []
    for split in ("val_calib", "val_test"):
        data = dataset.split(split, "evaluate")
        served = runtime.predict_images(data.images)
        z, y = logits[split]
        expected_raw = M.softmax(z)
        problems = []
        if not np.array_equal(y, data.labels):
            problems.append("labels differ from the Dataset's")
        max_diff = float(np.max(np.abs(served.raw_probs - expected_raw))) if len(y) else 0.0
        if max_diff > 1e-4:
            problems.append(f"probabilities differ by up to {max_diff:.2e}")
        expected = reported[split]
        decided = runtime.decide(M.log_softmax(z)).decisions.labels
        mismatched = int(np.sum(served.decisions.labels != decided))
        if mismatched:
            problems.append(f"{mismatched} decision(s) differ")
        served_metrics = split_metrics(served, data.labels)
        for key in ("accuracy", "coverage", "mcc"):
            if abs(served_metrics[key] - expected[key]) > 1e-9:
                problems.append(f"{key} {served_metrics[key]:.6f} != reported {expected[key]:.6f}")
        detail = "; ".join(problems) or f"{len(y)} images: decisions identical, max |Δp| {max_diff:.1e}"
        checks.append(Check(f"parity_{split}", not problems, detail))
    return checks


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
