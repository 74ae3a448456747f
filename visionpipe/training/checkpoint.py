"""Checkpoints of a training run: per epoch, the model, EMA and optimizer tensors as safetensors (written
atomically) and the rest as JSON (state.json, written last), never pickle; resume from them; and the
CheckpointMirror that copies them to s3:// or a shared folder so a retry on a fresh disk continues the run."""

import json
import os
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from visionpipe.serving import storage
from visionpipe.training import distributed
from visionpipe.training.errors import ResumeError, TrainError
from visionpipe.training.loop import RNG_SCHEME, TrainState

CHECKPOINT_FORMAT = "visionpipe-train-checkpoint/v1"
STATE_FILE = "state.json"
Log = Callable[[str], None]


def save_checkpoint(loop: TrainState, checkpoint_dir: Path, best_changed: bool) -> None:
    """Write epoch `loop.epoch`'s state: tensors as safetensors, the rest as JSON; state.json is written last
    (atomically), so a crash mid-write leaves the previous epoch's checkpoint intact.

    Every rank of a multi-worker run calls it; rank 0 writes. An FSDP2-sharded model, EMA and optimizer state
    are gathered whole first (a collective), so the files have one format whatever the strategy and world size."""
    if not (loop.dist.is_main or loop.sharded):
        return
    optim_state = distributed.optimizer_state(loop.model, loop.optimizer, loop.sharded)
    model_state = distributed.full_state_dict(loop.model, loop.sharded)
    ema_state = distributed.full_state_dict(loop.ema, loop.sharded) if loop.ema is not None else {}
    if not loop.dist.is_main:
        return
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_state_json(checkpoint_dir)
    tensors, optim_meta = _optimizer_tensors(optim_state)
    tensors.update({f"model/{k}": v for k, v in model_state.items()})
    tensors.update({f"ema/{k}": v for k, v in ema_state.items()})
    state_name = f"state-{loop.epoch:04d}.safetensors"
    atomic_save(tensors, checkpoint_dir / state_name)
    best_name = str(previous.get("best_file", "")) if previous and not best_changed else ""
    if not best_name:
        best_name = f"best-{loop.best_epoch:04d}.safetensors"
        atomic_save(loop.best_state, checkpoint_dir / best_name)
    meta = {
        "format": CHECKPOINT_FORMAT,
        "recipe_hash": loop.recipe_hash,
        "epoch": loop.epoch,
        "step": loop.step,
        "ema_updates": loop.ema_updates,
        "best_epoch": loop.best_epoch,
        "best_metric": loop.best_metric,
        "best_loss": loop.best_loss,
        "stopped_early": loop.stopped_early,
        "history": loop.history,
        "optimizer": optim_meta,
        "rng": {"scheme": RNG_SCHEME},
        "state_file": state_name,
        "best_file": best_name,
    }
    _write_state_json(checkpoint_dir, meta)
    for stale in checkpoint_dir.glob("*.safetensors"):
        if stale.name not in (state_name, best_name):
            stale.unlink()


def resume(loop: TrainState, checkpoint_dir: Path, log: Log) -> int:
    """Load the last checkpoint into `loop` when there is one; returns the epoch resumed from (0 = fresh)."""
    meta = _read_state_json(checkpoint_dir)
    if meta is None:
        return 0
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{checkpoint_dir}: unknown checkpoint format {meta.get('format')!r}")
    if meta.get("recipe_hash") != loop.recipe_hash:
        raise ResumeError(
            f"{checkpoint_dir} holds a checkpoint of another recipe (hash {str(meta.get('recipe_hash'))[:12]}"
            f" vs {loop.recipe_hash[:12]}); use an empty checkpoint directory for a new recipe"
        )
    tensors = load_file(str(checkpoint_dir / str(meta["state_file"])))
    _load_prefixed(loop.model, tensors, "model/", loop.sharded)
    if loop.ema is not None:
        _load_prefixed(loop.ema, tensors, "ema/", loop.sharded)
    optim_state = _optimizer_state(tensors, meta["optimizer"])
    distributed.load_optimizer_state(loop.model, loop.optimizer, optim_state, loop.sharded)
    loop.best_state = load_file(str(checkpoint_dir / str(meta["best_file"])))
    loop.epoch, loop.step = _json_int(meta, "epoch"), _json_int(meta, "step")
    loop.ema_updates = _json_int(meta, "ema_updates")
    loop.best_epoch, loop.best_metric = _json_int(meta, "best_epoch"), _json_float(meta, "best_metric")
    loop.best_loss = _json_float(meta, "best_loss")
    loop.stopped_early = bool(meta["stopped_early"])
    history = meta["history"]
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise ResumeError(f"{checkpoint_dir / STATE_FILE}: history must be a list of objects")
    loop.history = [{str(k): float(v) for k, v in h.items()} for h in history]
    log(f"resumed from {checkpoint_dir} after epoch {loop.epoch}")
    return loop.epoch


class CheckpointMirror:
    """A copy of the checkpoint directory at `uri` (s3://bucket/prefix or a shared folder), so that a retry in a
    fresh pod (on a cluster a retried attempt starts with an empty local disk) resumes where the failed one
    stopped.

    `pull` fetches the remote checkpoint when it is newer than the local one (tensors first, state.json last);
    `push` uploads the tensors first and state.json last, the order of the local writes, so an attempt killed
    mid-upload leaves the previous epoch's remote checkpoint whole, then deletes remote tensors that
    state.json no longer names."""

    def __init__(self, uri: str, local_dir: Path, log: Log) -> None:
        if not (uri.startswith("s3://") or Path(uri).is_absolute()):
            raise TrainError(
                f"checkpoint_uri={uri!r} must be an s3://bucket/prefix URI or an absolute folder path (shared by the "
                "attempts of a task); leave it empty to keep the checkpoint beside the model artifact only"
            )
        if uri.startswith("s3://"):
            storage.split_s3(uri)  # an s3:// URI without a bucket name is refused here, before training
        self.uri, self.local_dir, self.log = uri.rstrip("/"), local_dir, log
        self._uploaded: set[str] = set()

    def pull(self) -> None:
        remote_state = storage.join(self.uri, STATE_FILE)
        if not storage.exists(remote_state):
            self.log(f"no checkpoint at {self.uri} yet; mirroring each epoch there")
            return
        remote = _parse_state(storage.read_bytes(remote_state).decode(), remote_state)
        local = _read_state_json(self.local_dir)
        if local is not None and _json_int(local, "epoch") >= _json_int(remote, "epoch"):
            return
        names = [str(remote.get("state_file", "")), str(remote.get("best_file", ""))]
        if not all(names):
            raise ResumeError(f"{remote_state} does not name its state_file and best_file")
        for name in names:
            storage.download_file(storage.join(self.uri, name), self.local_dir / name)
        _write_state_json(self.local_dir, remote)
        self._uploaded.update(names)
        self.log(f"fetched the epoch {_json_int(remote, 'epoch')} checkpoint from {self.uri}")

    def push(self) -> None:
        meta = _read_state_json(self.local_dir)
        if meta is None:
            return
        keep = {str(meta["state_file"]), str(meta["best_file"])}
        for name in sorted(keep - self._uploaded):
            storage.upload_file(self.local_dir / name, storage.join(self.uri, name))
        storage.upload_file(self.local_dir / STATE_FILE, storage.join(self.uri, STATE_FILE))
        self._uploaded = keep
        for uri in storage.list_uris(self.uri):
            name = uri.rsplit("/", 1)[-1]
            if name.endswith(".safetensors") and name not in keep:
                storage.delete(uri)


def remove_mirror(uri: str) -> None:
    """Delete a checkpoint mirror (every object below `uri`) once the training outputs are written."""
    try:
        objects = storage.list_uris(uri)
    except storage.ObjectNotFound:
        return
    for obj in objects:
        storage.delete(obj)


def _json_int(meta: dict[str, object], key: str) -> int:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ResumeError(f"checkpoint {STATE_FILE}: {key}={value!r} must be an integer")
    return value


def _json_float(meta: dict[str, object], key: str) -> float:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ResumeError(f"checkpoint {STATE_FILE}: {key}={value!r} must be a number")
    return float(value)


def _read_state_json(checkpoint_dir: Path) -> dict[str, object] | None:
    path = checkpoint_dir / STATE_FILE
    if not path.is_file():
        return None
    return _parse_state(path.read_text(), str(path))


def _write_state_json(checkpoint_dir: Path, meta: dict[str, object]) -> None:
    """state.json, written atomically (temp file + rename): it is always the last file of a checkpoint."""
    tmp = checkpoint_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, checkpoint_dir / STATE_FILE)


def _parse_state(text: str, where: str) -> dict[str, object]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResumeError(f"{where} is not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ResumeError(f"{where} must hold a JSON object")
    return data


def _optimizer_tensors(sd: distributed.OptimState) -> tuple[dict[str, Tensor], dict[str, object]]:
    """Split an optimizer state dict (torch's numbered layout) into tensors (safetensors) and JSON-able
    metadata."""
    tensors: dict[str, Tensor] = {}
    per_param: dict[str, dict[str, object]] = {}
    per_pid = sd["state"]
    assert isinstance(per_pid, dict)
    for pid, state in per_pid.items():
        plain: dict[str, object] = {}
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim/{pid}/{key}"] = value.detach().cpu().contiguous().clone()
            else:
                plain[key] = value
        per_param[str(pid)] = plain
    return tensors, {"param_groups": sd["param_groups"], "state": per_param}


def _optimizer_state(tensors: dict[str, Tensor], meta: object) -> distributed.OptimState:
    """The numbered-layout optimizer state dict of a checkpoint (the inverse of `_optimizer_tensors`)."""
    if not isinstance(meta, dict):
        raise ResumeError("checkpoint optimizer metadata is malformed")
    state: dict[int, dict[str, object]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, pid, name = key.split("/", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _load_prefixed(model: nn.Module, tensors: dict[str, Tensor], prefix: str, sharded: bool) -> None:
    state = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
    missing = set(model.state_dict()) - set(state)
    if missing:
        raise ResumeError(f"checkpoint lacks {len(missing)} {prefix.rstrip('/')} tensors, e.g. {sorted(missing)[:3]}")
    distributed.load_full_state_dict(model, state, sharded)


def atomic_save(tensors: dict[str, Tensor], path: Path) -> None:
    """Write safetensors to a temp file and rename it into place (never a half-written file at `path`)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)
