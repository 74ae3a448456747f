"""Shared KFP settings for every component: the project image and the component decorator."""

from collections.abc import Callable
from typing import TYPE_CHECKING

from kfp import dsl

if TYPE_CHECKING:  # importing it at run time inside a running component is a circular import in kfp
    from kfp.dsl.pipeline_task import PipelineTask
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


# ------------------------------------------------------------------------------- Kubernetes settings of steps
# kfp.kubernetes writes these into the task's platform config; the compiler merges the config of tasks inside a
# pipeline-as-component into the one platform spec (kfp/compiler/pipeline_spec_builder.py
# `build_spec_by_group`, `merge_platform_specs`), so the decision sub-graph's steps keep theirs.
def use_s3_secret(task: "PipelineTask") -> None:
    """Mount the S3 Secret as environment variables of a step that reads or writes s3:// URIs.

    Not optional (``optional=False``, kfp/kubernetes/secret.py `use_secret_as_env`): the KFP driver turns every key
    into an env var with a ``secretKeyRef`` carrying that flag (kubeflow/pipelines backend/src/v2/driver,
    extendPodSpecPatch), so Kubernetes refuses to start the step (CreateContainerConfigError naming the Secret or
    the key) while the Secret or any key of S3_SECRET_KEYS is missing, instead of running it without credentials.
    kfp.local never reads the Kubernetes platform config (nothing under kfp/local/ reads ``platform_config`` /
    ``platform_spec``), so local runs are unaffected.
    """
    from kfp import kubernetes

    from visionpipe.serving.storage import S3_SECRET, S3_SECRET_KEYS  # the Secret and its keys (manifests/common)

    kubernetes.use_secret_as_env(task, secret_name=S3_SECRET, secret_key_to_env=S3_SECRET_KEYS, optional=False)


def use_signing_secret(task: "PipelineTask") -> None:
    """Mount the bundle signing key (Secret `visionpipe-signing-key`, key `signing-key`) on a step that writes or
    verifies a bundle. Not optional, like the S3 Secret: a bundle signed with a key made in the pod would be refused
    by every server as `untrusted_key` (bundle_validation also refuses to start signing without it), and export's
    re-verification trusts the public half of that key."""
    from kfp import kubernetes

    from visionpipe.phases.pod import SIGNING_SECRET, SIGNING_SECRET_KEYS

    kubernetes.use_secret_as_env(
        task, secret_name=SIGNING_SECRET, secret_key_to_env=SIGNING_SECRET_KEYS, optional=False
    )


def training_resources(task: "PipelineTask") -> None:
    """Cluster resources for the training steps (ignored by kfp.local); retries resume from the checkpoint (kept
    in the pod, and mirrored to checkpoint_uri with the S3 credentials of the secret when that is set)."""
    task.set_cpu_request("2").set_memory_request("4G").set_memory_limit("16G")
    task.set_retry(num_retries=2, backoff_duration="30s", backoff_factor=2.0)
    use_s3_secret(task)


def runs_own_image(task: "PipelineTask") -> None:
    """Tell a step which image it runs (env IMAGE_ENV), for the pods it starts itself: supervised_train's
    TrainJob workers (visionpipe/kfp/scale_out.py) must run the very code of the step. The value here is the
    placeholder; `visionpipe compile --image REF` rewrites it together with every executor's image."""
    from visionpipe.phases.pod import IMAGE_ENV

    task.set_env_variable(IMAGE_ENV, BASE_IMAGE)


# ------------------------------------------------------------------------------- run-time placeholders
# The run's scheduled / creation time, passed as task inputs (runtime-value constants in the IR). The KFP driver
# substitutes them only when a task input *is* one of these strings (kubeflow/pipelines backend/src/v2/driver/
# resolve.go, `resolveInputParameter`): 2.17+ with RFC 3339 UTC times (schedule time from the Workflow's
# workflowEpoch label, else the create time: backend/src/v2/cmd/driver/main.go), 2.16 with "", older releases not
# at all (the literal passes through). visionpipe.phases.monthly.run_time reads all three.
SCHEDULE_TIME = dsl.PIPELINE_JOB_SCHEDULE_TIME_UTC_PLACEHOLDER
CREATE_TIME = dsl.PIPELINE_JOB_CREATE_TIME_UTC_PLACEHOLDER
