"""supervised_train with `train_workers` > 1: the same training, data-parallel, with the step's outputs unchanged.

Where the workers run:

- **in a Kubeflow Pipelines pod** (`pod.in_kfp_pod`): one Kubeflow Trainer v2 TrainJob
  (visionpipe/kfp/trainjob.py) with `train_workers` nodes of the project image, each running
  ``torchrun -m visionpipe.phases.train_worker``. The step stages its inputs in S3 under ``checkpoint_uri``
  (`trainjob.staging_layout`: ``dataset/``, ``backbone/``, ``out/``, ``checkpoint/``), follows the job, then copies
  ``out/`` into its own KFP outputs and removes the staging prefix. The checkpoint mirror stays under
  ``checkpoint/`` until the outputs are written, so a retried step (same model URI, same TrainJob name)
  re-attaches to its job or resumes from that checkpoint.
- **anywhere else** (kfp.local, a workstation): ``torchrun --standalone --nproc_per_node=train_workers`` on this
  machine (gloo on CPU), the same worker module; its checkpoint is the step's own checkpoint folder (and the
  ``checkpoint_uri`` mirror when one is set), so a retry resumes here too.

Either way the step gets back exactly what a single-process run writes: ``model/``, ``logits/``, the curve
PNG and the TrainResult (``result.json``), checked complete by the worker's ``_SUCCESS`` marker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from visionpipe.kfp.trainjob import MAX_WORKERS, KubeTrainJobApi
from visionpipe.phases.pod import IMAGE_ENV, in_kfp_pod
from visionpipe.phases.supervised_train import TrainResult
from visionpipe.serving import storage
from visionpipe.training.passthrough import is_passthrough

Log = Callable[[str], None]


class ScaleOutError(ValueError):
    """train_workers cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class Outputs:
    """Where the step wants the training outputs."""

    model_dir: Path
    logits_dir: Path
    curve_png: Path


def check_workers(train_workers: int, checkpoint_uri: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a train_workers value that cannot run here, with the fix."""
    if isinstance(train_workers, bool) or not isinstance(train_workers, int) or not 1 <= train_workers <= MAX_WORKERS:
        raise ScaleOutError(
            f"train_workers={train_workers!r} is not allowed; allowed values: an integer in [1, {MAX_WORKERS}] "
            "(1 = one process in the step's own pod)"
        )
    if train_workers > 1 and in_kfp_pod(environ) and not storage.is_s3(checkpoint_uri):
        raise ScaleOutError(
            f"train_workers={train_workers} runs a Kubeflow Trainer TrainJob, whose pods exchange the dataset, the "
            f"checkpoints and the model with this step through S3, but checkpoint_uri={checkpoint_uri!r} is not an "
            "s3:// URI: pass -p checkpoint_uri=s3://<bucket>/checkpoints (credentials from the S3 Secret)"
        )


def train_with_workers(
    *,
    dataset_dir: Path,
    outputs: Outputs,
    recipe: str,
    recipe_overrides_json: str,
    backbone_dir: Path | None,
    checkpoint_dir: Path,
    checkpoint_uri: str,
    mirror: str,
    train_workers: int,
    task_key: str,
    log: Log = print,
    timeout_s: float = 6 * 3600.0,
    environ: Mapping[str, str] | None = None,
    api: KubeTrainJobApi | None = None,
    poll_s: float = 10.0,
) -> TrainResult:
    """Train with `train_workers` data-parallel workers (a TrainJob in a KFP pod, else local torchrun) and write
    the outputs a single-process supervised_train writes; returns its TrainResult. `checkpoint_uri` is the run
    form's; `mirror` the task's checkpoint mirror under it (the local workers' --checkpoint-uri; a TrainJob uses
    the staging's ``checkpoint/``); `task_key` the step's model output URI (stable across its retries). `api`:
    the Kubernetes API for TrainJobs (default: connected like kubectl, in a pod its service account)."""
    env = os.environ if environ is None else environ
    check_workers(train_workers, checkpoint_uri, env)
    backbone = None if is_passthrough(backbone_dir) else backbone_dir
    with tempfile.TemporaryDirectory(prefix="visionpipe-scale-out-") as tmp:
        out = Path(tmp) / "out"
        if in_kfp_pod(env):
            job = Job(recipe, recipe_overrides_json, train_workers, task_key, timeout_s, poll_s)
            _on_cluster(dataset_dir, out, backbone, checkpoint_uri, job, log, env, api)
        else:
            _local(dataset_dir, out, recipe, recipe_overrides_json, backbone, checkpoint_dir, mirror, train_workers,
                   log, timeout_s)  # fmt: skip
        return _collect(out, outputs)


def _local(
    dataset_dir: Path,
    out: Path,
    recipe: str,
    overrides: str,
    backbone: Path | None,
    checkpoint_dir: Path,
    mirror: str,
    workers: int,
    log: Log,
    timeout_s: float,
) -> None:
    from visionpipe.training.distributed import run_torchrun

    argv = ["--dataset", str(dataset_dir), "--out", str(out), "--recipe", recipe, "--recipe-overrides-json", overrides]
    argv += ["--checkpoint-dir", str(checkpoint_dir)]
    if backbone is not None:
        argv += ["--backbone", str(backbone)]
    if mirror:
        argv += ["--checkpoint-uri", mirror]
    log(f"supervised_train: {workers} local workers (torchrun --standalone, gloo on CPU / nccl on CUDA)")
    run_torchrun(workers, argv, timeout_s=timeout_s, log=log, max_restarts=2)  # as the TrainJob runtime: 2 restarts


@dataclass(frozen=True)
class Job:
    """What the TrainJob runs and how long the step follows it."""

    recipe: str
    overrides: str
    workers: int
    task_key: str
    timeout_s: float
    poll_s: float


def _on_cluster(
    dataset_dir: Path,
    out: Path,
    backbone: Path | None,
    checkpoint_uri: str,
    job: Job,
    log: Log,
    env: Mapping[str, str],
    api: KubeTrainJobApi | None,
) -> None:
    from visionpipe.kfp import trainjob
    from visionpipe.training.recipes import parse_overrides

    image = env.get(IMAGE_ENV, "")
    if not image:
        raise ScaleOutError(
            f"{IMAGE_ENV} is not set in this step, so the TrainJob cannot run the step's own image: compile the "
            "pipeline with `visionpipe compile --image <registry>/visionpipe@sha256:<digest>` (it sets it)"
        )
    staging = trainjob.staging_layout(checkpoint_uri, job.task_key)
    log(f"supervised_train: staging the dataset at {staging.dataset}")
    storage.upload_prefix(dataset_dir, staging.dataset)
    if backbone is not None:
        storage.upload_prefix(backbone, staging.backbone)
    kube = trainjob.KubeTrainJobApi.connect() if api is None else api
    spec = trainjob.TrainJobRequest(
        namespace=kube.default_namespace or "default",
        image=image,
        recipe=job.recipe,
        workers=job.workers,
        staging=staging,
        recipe_overrides=parse_overrides(job.overrides),
        with_backbone=backbone is not None,
        timeout_s=job.timeout_s,
    )
    trainjob.run_trainjob(kube, spec, log=log, poll_s=job.poll_s)
    storage.download_prefix(staging.out, out)
    for uri in storage.list_uris(staging.root):  # everything is in the step's outputs now: the staging goes
        storage.delete(uri)


def _collect(out: Path, outputs: Outputs) -> TrainResult:
    """Copy the worker's --out into the step's outputs; refuse an incomplete one."""
    from visionpipe.phases.train_worker import CURVE_FILE, RESULT_FILE, SUCCESS_FILE

    missing = [n for n in (SUCCESS_FILE, RESULT_FILE, "model", "logits") if not (out / n).exists()]
    if missing:
        raise ScaleOutError(f"the training workers' output {out} lacks {', '.join(missing)}: the run did not finish")
    for src, dst in ((out / "model", outputs.model_dir), (out / "logits", outputs.logits_dir)):
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst, dirs_exist_ok=True)
    if (out / CURVE_FILE).is_file():
        shutil.copyfile(out / CURVE_FILE, outputs.curve_png)
    return TrainResult.from_json((out / RESULT_FILE).read_text())


__all__ = ["Outputs", "ScaleOutError", "check_workers", "train_with_workers"]
