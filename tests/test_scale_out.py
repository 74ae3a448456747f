"""supervised_train with train_workers > 1 (visionpipe/kfp/scale_out.py): the step's own path, end to end.

- On a cluster: the step stages its dataset in real S3 (SeaweedFS), creates a TrainJob on the fake Trainer API
  (tests/fake_trainer.py: CRD, webhook, runtimeRef resolved against manifests/trainer), and the fake's
  "controller" runs exactly the container the Trainer would run (the resolved command and args of the ``node``
  job) as local torchrun workers reading and writing that S3; the step then holds the same outputs as a
  one-process run and the staging prefix is gone.
- Elsewhere: local torchrun workers, outputs copied into the step's folders.
- The refusals: train_workers out of range, a cluster run without an s3:// checkpoint_uri or without the image.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_trainer import COMPLETED, FakeTrainer, Step
from k8s_schema import PLATFORM, render

from visionpipe.kfp import scale_out
from visionpipe.kfp import trainjob as T
from visionpipe.phases import supervised_train as st
from visionpipe.phases.pod import IMAGE_ENV
from visionpipe.rollout.canary import Connection
from visionpipe.serving import storage
from visionpipe.training import distributed
from visionpipe.training.recipes import Recipe, load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from test_supervised_train import make_dataset  # the shared tiny dataset writer

ROOT = Path(__file__).resolve().parents[1]
KUBECTL = shutil.which("kubectl")
IMAGE = "registry.example.com/ml/visionpipe@sha256:" + "cd" * 32
MODEL_URI = "s3://mlpipeline/v2/artifacts/training/1a2b/supervised-train/3c4d/model"
POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KFP_POD_NAME": "training-abc-supervised-train", "KFP_POD_UID": "u"}
OVERRIDES = {
    "epochs": 2,
    "batch_size": 16,
    "num_workers": 0,
    "arch": {"name": "cnn-small", "width": 4, "dropout": 0.0},
    "preprocess": {"kind": "standard", "channels": 0, "size": 8, "mean": [0.5], "std": [0.5]},
}
OUTPUT_FILES = {"model/model.safetensors", "model/model.json", "logits/val_calib.npz", "logits/val_test.npz"}
pytestmark = [
    pytest.mark.skipif(KUBECTL is None, reason="kubectl not installed"),
    pytest.mark.skipif(not PLATFORM.is_dir(), reason=f"platform CRDs not found at {PLATFORM}"),
]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("scale-out-data"))


@pytest.fixture(scope="module")
def trainer() -> Iterator[FakeTrainer]:
    assert KUBECTL is not None
    with FakeTrainer(runtimes=render(ROOT / "manifests" / "trainer", KUBECTL)).running() as fake:
        yield fake


def outputs(root: Path) -> scale_out.Outputs:
    return scale_out.Outputs(model_dir=root / "model", logits_dir=root / "logits", curve_png=root / "curve.png")


def files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("workers", "message"),
    [(0, "allowed values: an integer in [1, 64]"), (65, "[1, 64]"), (True, "[1, 64]"), (2.0, "[1, 64]")],
)
def test_train_workers_out_of_range_is_refused_with_the_allowed_values(workers: object, message: str) -> None:
    with pytest.raises(scale_out.ScaleOutError, match=r"train_workers=.*" + message.replace("[", r"\[")):
        scale_out.check_workers(workers, "", {})  # type: ignore[arg-type]  # the bad value is the point


def test_the_run_form_bound_is_the_launchers() -> None:
    from visionpipe.specs.params import MAX_TRAIN_WORKERS, params

    assert MAX_TRAIN_WORKERS == T.MAX_WORKERS
    assert params("training")["train_workers"].problem(T.MAX_WORKERS + 1) is not None
    assert params("monthly-retrain")["train_workers"].problem(2) is None


def test_a_cluster_run_needs_an_s3_checkpoint_uri_and_the_image(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(scale_out.ScaleOutError, match=r"checkpoint_uri=''.*-p checkpoint_uri=s3://"):
        scale_out.check_workers(2, "", POD_ENV)
    scale_out.check_workers(2, "", {})  # not in a pod: local torchrun, no S3 needed
    scale_out.check_workers(1, "", POD_ENV)  # one process: as before
    with pytest.raises(scale_out.ScaleOutError, match=f"{IMAGE_ENV} is not set.*visionpipe compile --image"):
        train_two_workers(
            dataset, tmp_path, recipe_overrides_json="{}", checkpoint_uri="s3://bucket/checkpoints", environ=POD_ENV
        )
    assert not (tmp_path / "model").exists()


@pytest.mark.long
def test_on_a_cluster_the_step_runs_a_trainjob_through_s3_and_keeps_its_outputs(
    dataset: Path, trainer: FakeTrainer, s3_bucket: str, tmp_path: Path
) -> None:
    trainer.reset()
    workers_done = threading.Event()
    errors: list[BaseException] = []

    def run_the_node_container(job: dict[str, object]) -> None:
        """What the Trainer's JobSet would run: the resolved `node` container, its replicas as local ranks."""
        name = str(job["metadata"]["name"])  # type: ignore[index]  # a TrainJob object
        resolved = trainer.resolved[name]
        container = resolved["container"]
        assert isinstance(container, dict) and container["command"] == ["torchrun"]
        args = [str(a) for a in container["args"]]
        assert args[:2] == ["--module", T.WORKER_MODULE]

        def go() -> None:
            try:
                distributed.run_torchrun(int(str(resolved["replicas"])), args[2:], timeout_s=300, log=lambda _: None)
            except BaseException as exc:
                errors.append(exc)
            finally:
                workers_done.set()

        threading.Thread(target=go, daemon=True).start()

    def wait_for_workers(_job: dict[str, object]) -> None:
        assert workers_done.wait(300), "the workers did not finish"

    # Running while the workers train (each poll waits up to 0.25 s for them; bounded: 1200 polls), then Complete.
    trainer.plan = lambda job: [
        Step(active=1, on_enter=run_the_node_container),
        *[Step(active=1, ready=1, on_enter=lambda _: workers_done.wait(0.25)) for _ in range(1200)],
        Step(succeeded=1, condition=COMPLETED, on_enter=wait_for_workers),
    ]
    api = T.KubeTrainJobApi.connect(Connection(host=trainer.url, token=trainer.token, timeout_s=30.0))
    lines: list[str] = []
    result = train_two_workers(
        dataset,
        tmp_path,
        checkpoint_uri=f"{s3_bucket}/checkpoints",
        log=lines.append,
        environ={**POD_ENV, IMAGE_ENV: IMAGE},
        api=api,
        poll_s=0.05,
    )
    assert errors == []
    assert files(tmp_path) >= OUTPUT_FILES and (tmp_path / "curve.png").is_file()
    assert result.epochs_run == 2 and 0 < result.best_epoch <= 2
    job = trainer.objects[("default", T.trainjob_name(MODEL_URI))]
    assert job["spec"]["trainer"]["image"] == IMAGE and job["spec"]["trainer"]["numNodes"] == 2  # type: ignore[index]
    assert any("staging the dataset" in line for line in lines) and any("Complete" in line for line in lines)
    staging = T.staging_layout(f"{s3_bucket}/checkpoints", MODEL_URI)
    assert storage.list_uris(staging.root) == [], "the staging prefix is removed once the outputs are the step's"
    # the outputs have the one-process format: a plain run of the same recipe writes the same files and tensors
    plain = st.run(
        dataset, tmp_path / "plain" / "model", tmp_path / "plain" / "logits", _recipe(), tmp_path / "plain" / "ck"
    )
    assert files(tmp_path / "plain") >= OUTPUT_FILES
    assert (
        json.loads((tmp_path / "model" / "model.json").read_text()).keys()
        == json.loads((tmp_path / "plain" / "model" / "model.json").read_text()).keys()
    )
    assert plain.epochs_run == result.epochs_run


@pytest.mark.long
def test_elsewhere_the_step_runs_local_torchrun_workers(dataset: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    result = train_two_workers(dataset, tmp_path, checkpoint_uri="", log=lines.append, environ={})
    assert files(tmp_path) >= OUTPUT_FILES and (tmp_path / "curve.png").is_file()
    assert result.epochs_run == 2
    assert any("2 local workers" in line for line in lines)
    assert (tmp_path / "ckpt").is_dir(), "the step's own checkpoint folder holds the workers' checkpoint"


def train_two_workers(dataset: Path, tmp_path: Path, **changes: object) -> st.TrainResult:
    """scale_out.train_with_workers with 2 workers, digits-cnn + OVERRIDES, outputs and checkpoint folder under
    `tmp_path`; `changes` adds or replaces keyword arguments."""
    arguments: dict[str, object] = {
        "dataset_dir": dataset,
        "outputs": outputs(tmp_path),
        "recipe": "digits-cnn",
        "recipe_overrides_json": json.dumps(OVERRIDES),
        "backbone_dir": None,
        "checkpoint_dir": tmp_path / "ckpt",
        "mirror": "",
        "train_workers": 2,
        "task_key": MODEL_URI,
        **changes,
    }
    return scale_out.train_with_workers(**arguments)  # type: ignore[arg-type]  # the keywords of train_with_workers


def _recipe() -> Recipe:
    return load_recipe("digits-cnn", OVERRIDES)
