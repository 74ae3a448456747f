"""Phase 6, bundle_validation: assemble the candidate bundle and check it before anything is published.

The candidate is assembled from the trained model, the decision phases' outputs and the Dataset, written
through `visionpipe.serving.bundle.write_bundle`, then checked:

  bundle_verifies   reload through `visionpipe.serving.bundle.read_bundle`: schema, fields, checksums, preprocessing
                    signature, calibrator and policy consistency
  split_contract    val_test shares no image with train / val_select / val_calib, and the model was trained and
                    selected on this Dataset's train / val_select splits (fingerprints)
  parity            the reloaded bundle, fed val_test (and val_calib) images through serving's preprocessing,
                    reproduces the training-side probabilities and the decisions, image for image, and so the
                    metrics the bundle reports
  quality gates     min accuracy, min MCC (binary), max ECE on val_test
  champion          optional: not worse than the champion bundle by more than a margin on the same val_test

Every failed check is named in the report; the step then fails and the candidate's bundle.json is removed,
so a failed candidate can never be loaded.
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

import datetime as dt
import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output
from sklearn.metrics import matthews_corrcoef

from visionpipe.data.datasets import Dataset as LoadedDataset
from visionpipe.data.datasets import load_dataset
from visionpipe.kfp.platform import component
from visionpipe.serving import metrics as M
from visionpipe.serving.bundle import (
    BUNDLE_FILE,
    BundleError,
    BundleModel,
    Prediction,
    read_bundle,
    write_bundle,
)
from visionpipe.serving.policies import ABSTAIN

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


class ValidationFailed(RuntimeError):
    """The candidate failed one or more checks; the message names every failed check."""


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
) -> ValidationResult:
    """Assemble the candidate bundle in `out_dir`, run every check, and fail (ValidationFailed) if any fails."""
    dataset = load_dataset(dataset_dir)
    model_info = _read_json(model_dir / "model.json")
    calibration = _read_json(calibration_dir / "calibration.json")
    threshold = _read_json(threshold_dir / "threshold.json") if threshold_dir else {}
    logits = {s: _load_npz(logits_dir / f"{s}.npz") for s in ("val_calib", "val_test")}

    reported = reported_metrics(calibration, logits)
    manifest = assemble_manifest(dataset, model_info, calibration, threshold, reported, name, parent_bundle)
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
    result.checks.append(check_split_contract(dataset, model_info))
    if runtime is not None:
        result.checks.extend(check_parity(runtime, dataset, logits, reported))
        result.checks.extend(check_gates(reported["val_test"], gates, dataset.positive_index is not None))
        if gates.champion_uri:
            result.checks.append(check_champion(runtime, dataset, gates))
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
    from visionpipe.serving.preprocessing import PreprocessSpec

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


# ----------------------------------------------------------------------------------------------- component


@component
def bundle_validation(
    dataset: Input[Dataset],
    model: Input[Model],
    logits: Input[Artifact],
    threshold: Input[Artifact],
    calibration: Input[Artifact],
    bundle: Output[Model],
    report: Output[Markdown],
    metrics: Output[Metrics],
    model_name: str = "visionpipe-model",
    description: str = "",
    submitter: str = "",
    parent_bundle: str = "",
    min_accuracy: float = -1.0,
    min_mcc: float = -2.0,
    max_ece: float = -1.0,
    champion_uri: str = "",
    champion_margin: float = 0.0,
) -> None:
    """Assemble the candidate bundle and check it: schema, checksums, preprocessing signature, policy, split
    contract, parity with training, quality gates (negative = off) and the optional champion. Fails the step,
    naming every failed check, when any check fails."""
    from visionpipe.phases.pod import require_s3_credentials, require_signing_key_in_pod

    require_s3_credentials(champion_uri)  # first thing: no S3 settings -> fail naming the Secret, before any work
    require_signing_key_in_pod()  # on a cluster the bundle must be signed with the key serving trusts

    import json
    from pathlib import Path

    from visionpipe.phases.bundle_validation import Gates, ValidationFailed, run

    try:
        result = run(
            Path(dataset.path),
            Path(model.path),
            Path(logits.path),
            Path(calibration.path),
            Path(bundle.path),
            threshold_dir=Path(threshold.path),
            gates=Gates(min_accuracy, min_mcc, max_ece, champion_uri, champion_margin),
            name=model_name,
            description=description,
            submitter=submitter,
            parent_bundle=parent_bundle,
        )
    except ValidationFailed as exc:
        Path(report.path).write_text(str(exc).split("\n\n", 1)[-1])
        raise
    Path(report.path).write_text(result.report_markdown)
    for split, values in result.metrics.items():
        for key in ("accuracy", "mcc", "ece", "nll", "coverage"):
            if key in values:
                metrics.log_metric(f"{split}_{key}", round(float(values[key]), 6))
    bundle.metadata.update({"version": json.loads((Path(bundle.path) / "bundle.json").read_text())["version"]})
    print(result.report_markdown)
