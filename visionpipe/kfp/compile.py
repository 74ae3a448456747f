"""Compile the pipelines to the IR YAML users upload in the Kubeflow UI, and check the checked-in copies.

Every executor runs one project image. KFP bakes a component's ``base_image`` in at decoration time
(``@dsl.component(base_image=...)``, kfp/dsl/component_factory.py), so the image is not re-chosen by re-importing
the modules: the YAML KFP writes is post-processed instead. `compile_pipeline(..., image=REF)` sets
``deploymentSpec.executors.<name>.container.image`` of every container executor to REF and writes the documents
back exactly as KFP writes them (the header comments, then ``yaml.dump_all(documents, sort_keys=True)``, as in
``write_pipeline_spec_to_file`` of kfp/compiler/pipeline_spec_builder.py), and refuses to write a file in which any
other line changed. Without ``image`` the file is KFP's output unchanged, naming the placeholder
`visionpipe.kfp.platform.BASE_IMAGE`.
"""

from __future__ import annotations

import difflib
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

COMPILED_DIR = Path(__file__).parent / "compiled"
EXAMPLE_IMAGE = "registry.example.com/visionpipe@sha256:" + "<64 hex digits>"


@dataclass(frozen=True)
class PipelineEntry:
    name: str
    load: Callable[[], object]


def _training() -> object:
    from visionpipe.kfp.training import training_pipeline

    return training_pipeline


def _monthly() -> object:
    from visionpipe.kfp.monthly import monthly_retrain_pipeline

    return monthly_retrain_pipeline


PIPELINES: tuple[PipelineEntry, ...] = (
    PipelineEntry("training", _training),
    PipelineEntry("monthly-retrain", _monthly),
)


# ------------------------------------------------------------------------------------------ image references
class ImageRefError(ValueError):
    """An image reference that a container runtime would not accept; the message shows the expected form."""


# The reference grammar of github.com/distribution/reference (reference.go), which Docker, containerd, CRI-O and
# Kubernetes image pulls follow: name [":" tag] ["@" digest], name = [domain "/"] path-component ["/" ...].
# Digests are restricted to sha256 (the algorithm registries return on push).
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:.]+\])(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REFERENCE = re.compile(
    rf"(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>.+))?"
)
_SHA256_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_NAME_MAX = 255


@dataclass(frozen=True)
class ImageRef:
    """A validated image reference; ``pinned`` when it names a digest (immutable)."""

    ref: str
    name: str
    tag: str | None
    digest: str | None

    @property
    def pinned(self) -> bool:
        return self.digest is not None

    def warning(self) -> str | None:
        """Why this reference is not reproducible (a tag can move), or None when it is pinned by digest."""
        if self.pinned:
            return None
        tag = f"tag {self.tag!r}" if self.tag else "no tag (that is `latest`)"
        return (
            f"image {self.ref!r} has {tag} and no digest: the image it names can change under the compiled "
            f"pipeline; pin it as {self.name}@sha256:<digest>, e.g. the digest `docker push` / `buildah push "
            "--digestfile` prints"
        )


def parse_image_ref(ref: str) -> ImageRef:
    """Validate an image reference; ImageRefError (with the expected form) when it is malformed."""
    expected = f"expected [registry[:port]/]repository[:tag]@sha256:<64 hex digits>, e.g. {EXAMPLE_IMAGE}"
    match = _REFERENCE.fullmatch(ref)
    if match is None:
        raise ImageRefError(f"image reference {ref!r} is malformed; {expected}")
    digest = match.group("digest")
    if digest is not None and _SHA256_DIGEST.fullmatch(digest) is None:
        raise ImageRefError(
            f"image reference {ref!r}: digest {digest!r} must be sha256: followed by 64 lowercase hex digits; "
            f"{expected}"
        )
    name = match.group("name")
    if len(name) > _NAME_MAX:
        raise ImageRefError(f"image reference {ref!r}: the name is {len(name)} characters, at most {_NAME_MAX}")
    return ImageRef(ref=ref, name=name, tag=match.group("tag"), digest=digest)


# ------------------------------------------------------------------------------------------------ compiling
def compile_pipeline(entry: PipelineEntry, out_dir: Path, image: str | None = None) -> Path:
    """Compile one pipeline to `<out_dir>/<name>.yaml`; with `image`, every executor runs that image."""
    from kfp import compiler

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{entry.name}.yaml"
    compiler.Compiler().compile(entry.load(), package_path=str(path))
    if image is not None:
        path.write_text(set_executor_images(path.read_text(), parse_image_ref(image).ref))
    return path


def compile_all(out_dir: Path = COMPILED_DIR, image: str | None = None) -> list[Path]:
    return [compile_pipeline(entry, out_dir, image) for entry in PIPELINES]


def set_executor_images(text: str, image: str) -> str:
    """The compiled YAML `text` with every container executor's image set to `image`, nothing else changed."""
    import yaml

    from visionpipe.phases.pod import IMAGE_ENV

    lines = text.splitlines(keepends=True)
    header_end = next((i for i, line in enumerate(lines) if not line.startswith("#")), len(lines))
    header = "".join(lines[:header_end])
    documents = list(yaml.safe_load_all("".join(lines[header_end:])))
    if not documents or not isinstance(documents[0], dict):
        raise ValueError("not a compiled pipeline: the first YAML document is not a mapping")
    executors = documents[0].get("deploymentSpec", {}).get("executors", {})
    containers = [spec["container"] for spec in executors.values() if isinstance(spec.get("container"), dict)]
    if not containers:
        raise ValueError("not a compiled pipeline: deploymentSpec.executors holds no container executor")
    for container in containers:
        container["image"] = image
        for env in container.get("env", []):  # the step's own image, for the workers it starts (IMAGE_ENV)
            if isinstance(env, dict) and env.get("name") == IMAGE_ENV:
                env["value"] = image
    # The same call as kfp/compiler/pipeline_spec_builder.py write_pipeline_spec_to_file, so the output is
    # formatted exactly like KFP's own.
    out = header + yaml.dump_all(documents, sort_keys=True)
    _check_only_images_changed(text, out)
    return out


def _check_only_images_changed(before: str, after: str) -> None:
    from visionpipe.phases.pod import IMAGE_ENV

    old, new = before.splitlines(), after.splitlines()
    # an executor's `image:` line, or the `value:` of its IMAGE_ENV entry (the line after `- name: IMAGE_ENV`)
    env_values = {i + 1 for i, line in enumerate(old) if line.strip() == f"- name: {IMAGE_ENV}"}

    def allowed(i: int, a: str, b: str) -> bool:
        key = "value:" if i in env_values else "image:"
        return a.lstrip().startswith(key) and b.lstrip().startswith(key) and a.index(key) == b.index(key)

    same_shape = len(old) == len(new) and all(
        allowed(i, a, b) for i, (a, b) in enumerate(zip(old, new, strict=True)) if a != b
    )
    if not same_shape:
        raise RuntimeError(
            "rewriting the executor images changed more than the image lines; kfp's YAML output format has "
            "changed and visionpipe/kfp/compile.py must follow it"
        )


def stale_pipelines(compiled_dir: Path = COMPILED_DIR, image: str | None = None) -> dict[str, str]:
    """Pipelines whose YAML in `compiled_dir` differs from a fresh compile (with `image`, or the default one):
    name -> unified diff (head)."""
    stale: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in PIPELINES:
            fresh = compile_pipeline(entry, Path(tmp), image).read_text().splitlines(keepends=True)
            current_path = compiled_dir / f"{entry.name}.yaml"
            current = current_path.read_text().splitlines(keepends=True) if current_path.exists() else []
            if fresh != current:
                diff = difflib.unified_diff(current, fresh, str(current_path), "fresh compile", n=1)
                stale[entry.name] = "".join(list(diff)[:40])
    return stale
