"""The pass-through backbone: what domain_pretrain writes when it is disabled, and supervised_train treats
exactly like no backbone (the training graph always runs domain_pretrain; see DESIGN.md, contract 4)."""

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
