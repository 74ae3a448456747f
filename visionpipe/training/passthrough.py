"""The pass-through backbone: what domain_pretrain writes when it is disabled, and supervised_train treats
exactly like no backbone. The training graph always runs domain_pretrain, since kfp.local 2.17.3 cannot resolve
an artifact dsl.OneOf (see visionpipe/kfp/training.py). Torch-free, so a disabled step does not import torch."""

import json
from pathlib import Path

MARKER_FILE = "backbone.json"
MARKER = {"passthrough": True}


def write_passthrough(out_dir: Path) -> Path:
    """Write the marker (`backbone.json` holding {"passthrough": true} and nothing else) into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MARKER_FILE
    path.write_text(json.dumps(MARKER) + "\n")
    return path


def is_passthrough(backbone_dir: Path | None) -> bool:
    """True when `backbone_dir` holds the pass-through marker (and so no trained backbone)."""
    if backbone_dir is None:
        return False
    path = backbone_dir / MARKER_FILE
    if not path.is_file():
        return False
    try:
        return bool(json.loads(path.read_text()) == MARKER)
    except json.JSONDecodeError:
        return False


def run_disabled(out_dir: Path) -> str:
    """Domain pretraining switched off: write the pass-through marker into `out_dir` (supervised_train then
    trains from its own initialisation, exactly as with no backbone) and return the one-line summary."""
    write_passthrough(out_dir)
    return "domain_pretrain: disabled (enabled=false); the backbone output is a pass-through marker\n"
