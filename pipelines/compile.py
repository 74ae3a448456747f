"""Compile the pipelines to the IR YAML users upload in the Kubeflow UI, and check the checked-in copies."""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPILED_DIR = Path(__file__).parent / "compiled"


@dataclass(frozen=True)
class PipelineEntry:
    name: str
    load: Callable[[], object]


def _training() -> object:
    from pipelines.training import training_pipeline

    return training_pipeline


def _monthly() -> object:
    from pipelines.monthly_retrain import monthly_retrain_pipeline

    return monthly_retrain_pipeline


PIPELINES: tuple[PipelineEntry, ...] = (
    PipelineEntry("training", _training),
    PipelineEntry("monthly-retrain", _monthly),
)


def compile_pipeline(entry: PipelineEntry, out_dir: Path) -> Path:
    from kfp import compiler

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{entry.name}.yaml"
    compiler.Compiler().compile(entry.load(), package_path=str(path))
    return path


def compile_all(out_dir: Path = COMPILED_DIR) -> list[Path]:
    return [compile_pipeline(entry, out_dir) for entry in PIPELINES]


def stale_pipelines(compiled_dir: Path = COMPILED_DIR) -> dict[str, str]:
    """Pipelines whose checked-in YAML differs from a fresh compile: name -> unified diff (head)."""
    stale: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in PIPELINES:
            fresh = compile_pipeline(entry, Path(tmp)).read_text().splitlines(keepends=True)
            current_path = compiled_dir / f"{entry.name}.yaml"
            current = current_path.read_text().splitlines(keepends=True) if current_path.exists() else []
            if fresh != current:
                diff = difflib.unified_diff(current, fresh, str(current_path), "fresh compile", n=1)
                stale[entry.name] = "".join(list(diff)[:40])
    return stale
