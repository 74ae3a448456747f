"""Shared KFP settings for every component: the project image and the component decorator."""

from collections.abc import Callable
from typing import TYPE_CHECKING

from kfp import dsl

if TYPE_CHECKING:  # importing it at run time inside a running component is a circular import in kfp
    from kfp.dsl.python_component import PythonComponent

# The image every executor of the compiled IR names (built from the repository's Dockerfile). Components are
# lightweight KFP components whose body only imports the project's own code, so the image must contain this
# distribution; kfp itself is installed in the image too, hence install_kfp_package=False.
#
# This is a PLACEHOLDER, kept in the checked-in visionpipe/kfp/compiled/*.yaml: REPLACE IT WITH YOUR DIGEST at compile
# time, `visionpipe compile --image registry.example.com/visionpipe@sha256:<64 hex> --out dist/pipelines`
# (visionpipe/kfp/compile.py rewrites every executor's image). It is digest-shaped so that the checked-in IR is
# reproducible, and it lives under the reserved `.invalid` domain (RFC 2606), so a package uploaded without
# `--image` fails at image pull with this very name instead of running whatever some mutable tag points at.
BASE_IMAGE = "registry.invalid/replace-with-your-image/visionpipe@sha256:" + "0" * 64


def component(func: Callable[..., object]) -> "PythonComponent":
    """`@dsl.component(base_image=BASE_IMAGE, install_kfp_package=False)` for a thin component function.

    Inside a running component KFP imports `kfp.dsl` in runtime mode (`_KFP_RUNTIME=true`), without its
    decorators; the component body then imports this module to reach the core function, so the decorator is
    skipped there (the undecorated function is never called in that process).
    """
    decorator = getattr(dsl, "component", None)
    if decorator is None:
        return func
    return decorator(base_image=BASE_IMAGE, install_kfp_package=False)(func)
