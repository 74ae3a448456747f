"""Helpers shared by the bundle signing and verification tests: a writable copy of a bundle, its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from visionpipe.serving import bundle as B

Manifest = dict[str, object]


def copy_bundle(candidate: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "bundle"
    shutil.copytree(candidate, dest)
    return dest


def read_manifest(root: Path) -> Manifest:
    data = json.loads((root / B.BUNDLE_FILE).read_text())
    assert isinstance(data, dict)
    return data
