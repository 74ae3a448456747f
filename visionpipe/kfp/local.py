"""Run a pipeline on this machine with kfp.local (SubprocessRunner, no virtualenv per task)."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from kfp import local


class ParameterError(ValueError):
    """A `-p name=value` argument does not match the pipeline's parameters."""


@dataclass(frozen=True)
class LocalRun:
    pipeline_root: Path
    outputs: Mapping[str, object]  # output name -> kfp artifact (with .path / .uri / .metadata)
    seconds: float

    def artifact_path(self, name: str) -> Path:
        artifact = self.outputs[name]
        path = getattr(artifact, "path", None)
        if not isinstance(path, str):
            raise KeyError(f"pipeline output {name!r} is not an artifact")
        return Path(path)


def pipeline_parameters(pipeline: object) -> dict[str, inspect.Parameter]:
    func = getattr(pipeline, "pipeline_func", None)
    if func is None:
        raise TypeError(f"{pipeline!r} is not a @dsl.pipeline")
    return dict(inspect.signature(func).parameters)


def parse_parameters(pipeline: object, pairs: list[str]) -> dict[str, object]:
    """`name=value` strings -> typed arguments, using the types of the pipeline's parameter defaults."""
    params = pipeline_parameters(pipeline)
    out: dict[str, object] = {}
    for pair in pairs:
        name, sep, raw = pair.partition("=")
        if not sep:
            raise ParameterError(f"{pair!r}: expected name=value")
        if name not in params:
            raise ParameterError(f"unknown pipeline parameter {name!r}; parameters are: {', '.join(params)}")
        default = params[name].default
        out[name] = _coerce(name, raw, default)
    return out


def run_pipeline(pipeline: Callable[..., object], arguments: Mapping[str, object], runs_dir: Path) -> LocalRun:
    """Run `pipeline` with kfp.local; artifacts land under `runs_dir` (one folder per run)."""
    from visionpipe.kfp.reaper import guard_descendants

    guard_descendants()  # task processes die with this one, even on SIGKILL (visionpipe/kfp/reaper.py)
    runs_dir = runs_dir.resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(runs_dir), raise_on_error=True)
    started = time.monotonic()
    task = pipeline(**arguments)
    outputs = dict(getattr(task, "outputs", {}) or {})
    return LocalRun(pipeline_root=runs_dir, outputs=outputs, seconds=time.monotonic() - started)


def _coerce(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError("expected true or false")
            return raw.lower() in ("true", "1")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise ParameterError(f"parameter {name}={raw!r}: {exc} (default is {default!r})") from exc
    return raw
