"""Pipeline graph, compiled YAML freshness and image, run form, platform config, kfp.local, CLI parameters."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from visionpipe.cli import main
from visionpipe.kfp.compile import (
    COMPILED_DIR,
    PIPELINES,
    ImageRefError,
    compile_all,
    parse_image_ref,
    set_executor_images,
    stale_pipelines,
)
from visionpipe.kfp.local import ParameterError, parse_parameters
from visionpipe.kfp.monthly import monthly_retrain_pipeline
from visionpipe.kfp.platform import BASE_IMAGE
from visionpipe.kfp.training import S3_SECRET, S3_SECRET_KEYS, training_pipeline
from visionpipe.phases.pod import IMAGE_ENV

DIGEST_REF = "registry.example.com/visionpipe@sha256:" + "0123456789abcdef" * 4
FUNCTIONS: dict[str, Callable[..., object]] = {
    "training": training_pipeline.pipeline_func,
    "monthly-retrain": monthly_retrain_pipeline.pipeline_func,
}
# Components whose step reads or writes s3:// URIs (data, checkpoints, champion, destination).
S3_COMPONENTS = {
    "training": {"data-fetch", "domain-pretrain", "supervised-train", "bundle-validation", "export"},
    "monthly-retrain": {"fetch-month", "champion-warm-start", "supervised-train", "bundle-validation", "export"},
}

Documents = list[dict[str, object]]


def _load(path: Path) -> Documents:
    docs = list(yaml.safe_load_all(path.read_text()))
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _executors(docs: Documents) -> dict[str, dict[str, object]]:
    deployment = docs[0]["deploymentSpec"]
    assert isinstance(deployment, dict)
    executors: dict[str, dict[str, object]] = deployment["executors"]
    return executors


def _root_parameters(docs: Documents) -> dict[str, dict[str, object]]:
    root = docs[0]["root"]
    assert isinstance(root, dict)
    params: dict[str, dict[str, object]] = root["inputDefinitions"]["parameters"]
    return params


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Documents]:
    """A fresh compile (default image) of both pipelines: name -> YAML documents (IR, platform spec)."""
    out = tmp_path_factory.mktemp("compiled")
    compile_all(out)
    return {entry.name: _load(out / f"{entry.name}.yaml") for entry in PIPELINES}


def test_checked_in_compiled_yaml_is_current() -> None:
    stale = stale_pipelines()
    assert not stale, "visionpipe/kfp/compiled is stale; run `visionpipe compile`:\n" + "\n".join(stale.values())


def test_compile_check_detects_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "--out", str(tmp_path)]) == 0
    assert main(["compile", "--check", "--out", str(tmp_path)]) == 0
    yaml_path = tmp_path / "training.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("builtin://sklearn-digits", "builtin://other", 1))
    assert main(["compile", "--check", "--out", str(tmp_path)]) == 1
    assert "training: compiled YAML is stale" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["seed=3"], {"seed": 3}),
        (["train_ratio=0.6", "source=s3://b/p"], {"train_ratio": 0.6, "source": "s3://b/p"}),
    ],
)
def test_parse_parameters_types_values(pairs: list[str], expected: dict[str, object]) -> None:
    assert parse_parameters(training_pipeline, pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["nope=1"], "unknown pipeline parameter 'nope'"), (["seed=x"], "seed='x'"), (["seed"], "name=value")],
)
def test_parse_parameters_errors(pairs: list[str], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        parse_parameters(training_pipeline, pairs)


def test_cli_rejects_bad_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-p", "bogus=1"]) == 2
    assert "unknown pipeline parameter 'bogus'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- image references
@pytest.mark.parametrize(
    ("ref", "pinned"),
    [
        (DIGEST_REF, True),
        ("registry.example.com:5000/team/visionpipe:1.2.0@sha256:" + "a" * 64, True),
        ("localhost/visionpipe@sha256:" + "f" * 64, True),
        ("localhost:5000/visionpipe:dev", False),
        ("visionpipe", False),
        ("ghcr.io/visionpipe/visionpipe:0.1.0", False),
    ],
)
def test_parse_image_ref_accepts_valid_references(ref: str, pinned: bool) -> None:
    parsed = parse_image_ref(ref)
    assert parsed.pinned is pinned
    assert (parsed.warning() is None) is pinned


@pytest.mark.parametrize(
    "ref",
    [
        "",
        "Registry.example.com/VisionPipe@sha256:" + "a" * 64,  # upper-case repository
        "visionpipe@sha256:abc123",  # short digest
        "visionpipe@sha256:" + "A" * 64,  # upper-case hex
        "visionpipe@md5:" + "a" * 32,  # not sha256
        "visionpipe:1.0:extra",
        "visionpipe:tag with space",
        "registry.example.com/visionpipe/",
        "-registry/visionpipe",
        "https://registry.example.com/visionpipe",
    ],
)
def test_parse_image_ref_refuses_malformed_references(ref: str) -> None:
    with pytest.raises(ImageRefError, match=r"sha256:<64 hex digits>|sha256: followed by 64"):
        parse_image_ref(ref)


def test_compile_image_rewrites_every_executor_and_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", "--out", str(tmp_path / "default")]) == 0
    assert main(["compile", "--image", DIGEST_REF, "--out", str(tmp_path / "pinned")]) == 0
    assert "warning" not in capsys.readouterr().err
    for entry in PIPELINES:
        default_path, pinned_path = (tmp_path / d / f"{entry.name}.yaml" for d in ("default", "pinned"))
        default, pinned = _load(default_path), _load(pinned_path)
        executors = _executors(pinned)
        containers = [spec["container"] for spec in executors.values() if "container" in spec]
        assert len(containers) == len(executors) >= 5
        assert all(isinstance(c, dict) and c["image"] == DIGEST_REF for c in containers)
        assert {spec["container"]["image"] for spec in _executors(default).values()} == {BASE_IMAGE}  # type: ignore[index]
        # the training step learns its own image (for the TrainJob it may start) from IMAGE_ENV: rewritten too
        own = [
            env
            for c in containers
            for env in c.get("env", [])  # type: ignore[union-attr]  # a container mapping
            if env["name"] == IMAGE_ENV
        ]
        assert len(own) == 1 and own[0]["value"] == DIGEST_REF
        for spec in executors.values():  # put the default image back: then the documents are identical
            container = spec["container"]
            assert isinstance(container, dict)
            container["image"] = BASE_IMAGE
        own[0]["value"] = BASE_IMAGE
        assert pinned == default
        changed = [
            (a, b)
            for a, b in zip(default_path.read_text().splitlines(), pinned_path.read_text().splitlines(), strict=True)
            if a != b
        ]
        assert len(changed) == len(containers) + len(own)
        assert all(
            a.strip() in (f"image: {BASE_IMAGE}", f"value: {BASE_IMAGE}")
            and b.strip() == a.strip().replace(BASE_IMAGE, DIGEST_REF)
            for a, b in changed
        )


def test_rewriting_the_images_keeps_kfps_formatting_byte_for_byte() -> None:
    for entry in PIPELINES:
        text = (COMPILED_DIR / f"{entry.name}.yaml").read_text()
        assert set_executor_images(text, BASE_IMAGE) == text


def test_compile_refuses_a_malformed_image_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["compile", "--image", "registry.example.com/VisionPipe:dev", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is malformed" in err and "[registry[:port]/]repository[:tag]@sha256:<64 hex digits>" in err
    assert not list(tmp_path.iterdir())


def test_compile_warns_on_a_mutable_tag_but_compiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ref = "localhost:5000/visionpipe:dev"
    assert main(["compile", "--image", ref, "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no digest" in err and "localhost:5000/visionpipe@sha256:<digest>" in err
    for entry in PIPELINES:
        executors = _executors(_load(tmp_path / f"{entry.name}.yaml"))
        images = {spec["container"]["image"] for spec in executors.values()}  # type: ignore[index]
        assert images == {ref}


def test_compile_check_compares_with_the_given_image(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "--image", DIGEST_REF, "--out", str(tmp_path)]) == 0
    assert main(["compile", "--check", "--image", DIGEST_REF, "--out", str(tmp_path)]) == 0
    assert main(["compile", "--check", "--out", str(tmp_path)]) == 1  # the default image differs
    assert f"image: {BASE_IMAGE}" in capsys.readouterr().err


def test_default_image_is_a_digest_pinned_placeholder() -> None:
    parsed = parse_image_ref(BASE_IMAGE)
    assert parsed.pinned and parsed.name.startswith("registry.invalid/")


# ----------------------------------------------------------------------------------------------- run form
@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_every_run_form_parameter_has_a_description(compiled: dict[str, Documents], name: str) -> None:
    params = _root_parameters(compiled[name])
    described = {p for p, spec in params.items() if isinstance(spec.get("description"), str) and spec["description"]}
    signature = set(inspect.signature(FUNCTIONS[name]).parameters)
    assert described == set(params) == signature
    assert len(signature) == {"training": 37, "monthly-retrain": 32}[name]
    destination = params["destination"]["description"]
    assert isinstance(destination, str) and "On a cluster it must be an s3://" in destination


@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_model_name_defaults_to_the_inference_service_name(compiled: dict[str, Documents], name: str) -> None:
    params = _root_parameters(compiled[name])
    assert params["model_name"]["defaultValue"] == "digits"
    if name == "monthly-retrain":
        assert params["isvc_name"]["defaultValue"] == "digits"


# ------------------------------------------------------------------------------------------ UI artifacts
@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
@pytest.mark.parametrize(
    ("component", "output", "schema"),
    [
        ("comp-threshold-sweep", "sweep_plot", "system.HTML"),
        ("comp-threshold-sweep", "classification_metrics", "system.ClassificationMetrics"),
        ("comp-threshold-sweep", "summary", "system.Markdown"),
        ("comp-threshold-sweep", "decision", "system.Artifact"),
        ("comp-calibrate", "reliability_diagram", "system.HTML"),
        ("comp-calibrate", "summary", "system.Markdown"),
        ("comp-calibrate", "calibration", "system.Artifact"),
    ],
)
def test_decision_steps_declare_ui_outputs(
    compiled: dict[str, Documents], name: str, component: str, output: str, schema: str
) -> None:
    components = compiled[name][0]["components"]
    assert isinstance(components, dict)
    artifacts = components[component]["outputDefinitions"]["artifacts"]
    assert artifacts[output]["artifactType"]["schemaTitle"] == schema


# ------------------------------------------------------------------------------------------- S3 Secret
@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_every_s3_step_mounts_the_secret_not_optional(compiled: dict[str, Documents], name: str) -> None:
    docs = compiled[name]
    assert len(docs) == 2, "the platform spec document is missing"
    platform = docs[1]["platforms"]
    assert isinstance(platform, dict)
    k8s_executors = platform["kubernetes"]["deploymentSpec"]["executors"]
    s3_executors = {
        executor
        for executor in _executors(docs)
        if any(executor == f"exec-{c}" or executor.startswith(f"exec-{c}-") for c in S3_COMPONENTS[name])
    }
    assert {e.removeprefix("exec-").rstrip("-0123456789") for e in s3_executors} == S3_COMPONENTS[name]
    assert s3_executors <= set(k8s_executors)
    from visionpipe.phases.pod import SIGNING_SECRET, SIGNING_SECRET_KEYS

    expected = {S3_SECRET: S3_SECRET_KEYS, SIGNING_SECRET: SIGNING_SECRET_KEYS}
    signing = set()
    for executor, config in k8s_executors.items():
        for mount in config.get("secretAsEnv", []):
            secret = mount["secretName"]
            assert secret in expected, executor
            assert mount["secretNameParameter"]["runtimeValue"]["constant"] == secret
            assert mount.get("optional", False) is False, f"{executor} mounts {secret} as optional"
            assert {m["secretKey"]: m["envVar"] for m in mount["keyToEnv"]} == expected[secret]
            if secret == SIGNING_SECRET:
                signing.add(executor.removeprefix("exec-").rstrip("-0123456789"))
    for executor in s3_executors:
        secrets = {m["secretName"] for m in k8s_executors[executor].get("secretAsEnv", [])}
        assert S3_SECRET in secrets, f"{executor} touches S3 but has no {S3_SECRET}"
    assert signing == {"bundle-validation", "export"}, "the steps that write bundles must get the signing key"


def test_kfp_local_ignores_the_kubernetes_secret(tmp_path: Path) -> None:
    """A step with a non-optional Secret that does not exist still runs under kfp.local (no platform config);
    kfp.local raises when a task fails."""
    from kfp import dsl, kubernetes, local

    def check_env():  # type: ignore[no-untyped-def]  # no annotations: this module's are strings, kfp needs types
        import os

        assert os.environ.get("VISIONPIPE_TEST_MARKER") == "set-by-the-test"

    step = dsl.component(base_image="python:3.11", install_kfp_package=False)(check_env)

    @dsl.pipeline(name="secret-locally")
    def secret_locally():  # type: ignore[no-untyped-def]
        task = step()
        kubernetes.use_secret_as_env(
            task, secret_name="no-such-secret", secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID"}
        )

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path))
    os.environ["VISIONPIPE_TEST_MARKER"] = "set-by-the-test"
    try:
        secret_locally()
    finally:
        del os.environ["VISIONPIPE_TEST_MARKER"]


# ------------------------------------------------------------------------------------ one decision sub-graph
DECISION_COMPONENTS = ("threshold-sweep", "calibrate", "bundle-validation", "export")


def _tasks(docs: Documents) -> list[tuple[str, str]]:
    """(dag, componentRef) of every task of every DAG: the root and each sub-DAG (pipeline-as-component, If)."""
    ir = docs[0]
    dags: list[tuple[str, dict[str, object]]] = [("root", ir["root"])]  # type: ignore[list-item]
    components = ir["components"]
    assert isinstance(components, dict)
    dags += [(name, spec) for name, spec in components.items() if "dag" in spec]
    out = []
    for name, spec in dags:
        tasks = spec["dag"]["tasks"]  # type: ignore[index]
        out += [(name, task["componentRef"]["name"]) for task in tasks.values()]
    return out


@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_the_decision_tasks_are_compiled_once(compiled: dict[str, Documents], name: str) -> None:
    docs = compiled[name]
    executors = set(_executors(docs))
    components = docs[0]["components"]
    assert isinstance(components, dict)
    tasks = _tasks(docs)
    for component in DECISION_COMPONENTS:
        assert [e for e in executors if e.startswith(f"exec-{component}")] == [f"exec-{component}"]
        assert [c for c in components if c.startswith(f"comp-{component}")] == [f"comp-{component}"]
        assert [dag for dag, ref in tasks if ref == f"comp-{component}"] == ["comp-decide-and-publish"]
    assert [dag for dag, ref in tasks if ref == "comp-decide-and-publish"] == ["root"]
    assert not any(c.startswith("comp-condition") for c in components) or name == "monthly-retrain"  # canary only


def test_training_graph_has_no_branch_copy(compiled: dict[str, Documents]) -> None:
    """domain_pretrain always runs (enabled = domain_pretrain_enabled) and feeds supervised_train: no dsl.If."""
    docs = compiled["training"]
    tasks = docs[0]["root"]["dag"]["tasks"]  # type: ignore[index]
    assert not [c for c in docs[0]["components"] if c.startswith("comp-condition")]  # type: ignore[union-attr]
    assert sorted(tasks) == [
        "check-training-run-form",
        "data-fetch",
        "decide-and-publish",
        "domain-pretrain",
        "resolve-model-spec",
        "supervised-train",
    ]
    enabled = tasks["domain-pretrain"]["inputs"]["parameters"]["enabled"]
    assert enabled["componentInputParameter"] == "domain_pretrain_enabled"
    backbone = tasks["supervised-train"]["inputs"]["artifacts"]["backbone"]["taskOutputArtifact"]
    assert backbone == {"outputArtifactKey": "backbone", "producerTask": "domain-pretrain"}


# ---------------------------------------------------------------------------------- caching, run-time inputs
SUB = "comp-decide-and-publish"
# (pipeline, DAG, task) -> enableCache. False for every task that reads or writes state outside its parameters and
# artifacts (prefixes, bundles, checkpoint mirror, destination, cluster); True for the pure ones. A new task must be
# classified here (the test compares the whole set).
CACHING = {
    ("training", "root", "check-training-run-form"): True,
    ("training", "root", "data-fetch"): False,  # source prefix
    ("training", "root", "resolve-model-spec"): True,
    ("training", "root", "domain-pretrain"): True,
    ("training", "root", "supervised-train"): False,  # checkpoint_uri mirror
    ("training", "root", "decide-and-publish"): False,
    ("training", SUB, "threshold-sweep"): True,
    ("training", SUB, "calibrate"): True,
    ("training", SUB, "bundle-validation"): False,  # champion_uri; version from the clock
    ("training", SUB, "export"): False,  # writes the destination
    ("monthly-retrain", "root", "check-monthly-run-form"): True,
    ("monthly-retrain", "root", "fetch-month"): False,  # the month's images, hard examples
    ("monthly-retrain", "root", "champion-warm-start"): False,  # the champion bundle
    ("monthly-retrain", "root", "supervised-train"): False,
    ("monthly-retrain", "root", "decide-and-publish"): False,
    ("monthly-retrain", "root", "condition-1"): False,
    ("monthly-retrain", "comp-condition-1", "canary-rollout"): False,  # patches the live InferenceService
    ("monthly-retrain", SUB, "threshold-sweep"): True,
    ("monthly-retrain", SUB, "calibrate"): True,
    ("monthly-retrain", SUB, "bundle-validation"): False,
    ("monthly-retrain", SUB, "export"): False,
}
# (pipeline, task) -> {input: placeholder} for every task input that KFP fills at run time
RUNTIME_INPUTS = {
    ("monthly-retrain", "fetch-month"): {
        "schedule_time": "{{$.pipeline_job_schedule_time_utc}}",
        "create_time": "{{$.pipeline_job_create_time_utc}}",
    },
}


def _dag_tasks(docs: Documents) -> dict[tuple[str, str], dict[str, object]]:
    """(DAG, task name) -> task spec, for the root DAG and every sub-DAG."""
    ir = docs[0]
    components = ir["components"]
    assert isinstance(components, dict)
    dags = [("root", ir["root"]), *((n, c) for n, c in components.items() if "dag" in c)]
    return {(dag, task): spec for dag, body in dags for task, spec in body["dag"]["tasks"].items()}  # type: ignore[index]


@pytest.mark.parametrize("source", ["fresh", "checked-in"])
@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_caching_options_per_task(compiled: dict[str, Documents], name: str, source: str) -> None:
    docs = compiled[name] if source == "fresh" else _load(COMPILED_DIR / f"{name}.yaml")
    tasks = _dag_tasks(docs)
    expected = {(dag, task): cache for (pipeline, dag, task), cache in CACHING.items() if pipeline == name}
    assert set(tasks) == set(expected), "a task is missing from CACHING (or gone): classify it"
    # proto3 leaves a false enableCache out: cachingOptions {} (or no cachingOptions at all) means not cached
    actual = {key: bool(spec.get("cachingOptions", {}).get("enableCache", False)) for key, spec in tasks.items()}  # type: ignore[union-attr]
    assert actual == expected


@pytest.mark.parametrize("source", ["fresh", "checked-in"])
@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_run_time_inputs_come_from_kfp_placeholders(compiled: dict[str, Documents], name: str, source: str) -> None:
    docs = compiled[name] if source == "fresh" else _load(COMPILED_DIR / f"{name}.yaml")
    found: dict[tuple[str, str], dict[str, str]] = {}
    for (_dag, task), spec in _dag_tasks(docs).items():
        for param, value in spec.get("inputs", {}).get("parameters", {}).items():  # type: ignore[union-attr]
            constant = value.get("runtimeValue", {}).get("constant")
            if isinstance(constant, str) and constant.startswith("{{$."):
                found.setdefault((name, task), {})[param] = constant
    assert found == {key: inputs for key, inputs in RUNTIME_INPUTS.items() if key[0] == name}
    if name == "monthly-retrain":  # fetch_month declares them as optional strings (kfp.local / older backends)
        declared = docs[0]["components"]["comp-fetch-month"]["inputDefinitions"]["parameters"]  # type: ignore[index]
        for param in ("schedule_time", "create_time"):
            assert declared[param] == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}


@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_the_pipeline_output_bundle_uri_is_exports_storage_uri(compiled: dict[str, Documents], name: str) -> None:
    ir = compiled[name][0]
    root = ir["root"]
    assert isinstance(root, dict)
    assert root["outputDefinitions"]["parameters"]["bundle_uri"] == {"parameterType": "STRING"}
    selector = root["dag"]["outputs"]["parameters"]["bundle_uri"]["valueFromParameter"]
    assert selector == {"outputParameterKey": "bundle_uri", "producerSubtask": "decide-and-publish"}
    sub = ir["components"]["comp-decide-and-publish"]  # type: ignore[index]
    inner = sub["dag"]["outputs"]["parameters"]["bundle_uri"]["valueFromParameter"]
    assert inner == {"outputParameterKey": "Output", "producerSubtask": "export"}


@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_check_run_form_runs_first_and_takes_the_whole_form(compiled: dict[str, Documents], name: str) -> None:
    ir = compiled[name][0]
    tasks = ir["root"]["dag"]["tasks"]  # type: ignore[index]
    check = f"check-{'training' if name == 'training' else 'monthly'}-run-form"
    assert tasks[check]["taskInfo"]["name"] == "check_run_form"
    params = tasks[check]["inputs"]["parameters"]
    assert {p: v["componentInputParameter"] for p, v in params.items()} == {
        p: p for p in _root_parameters(compiled[name])
    }
    firsts = ("data-fetch",) if name == "training" else ("fetch-month", "champion-warm-start")
    for first in firsts:
        assert check in tasks[first]["dependentTasks"]


@pytest.mark.parametrize("name", ["training", "monthly-retrain"])
def test_run_form_defaults_are_the_constraint_tables(name: str) -> None:
    from visionpipe.specs.params import defaults

    signature = inspect.signature(FUNCTIONS[name]).parameters
    declared = {p: v.default for p, v in signature.items() if v.default is not inspect.Parameter.empty}
    assert declared == defaults(name)


def test_compiling_does_not_import_torch(tmp_path: Path) -> None:
    """Compiling both pipelines imports only the thin components (visionpipe/kfp/components/), never torch."""
    import subprocess
    import sys

    code = (
        "import sys, pathlib\n"
        "from visionpipe.kfp.compile import compile_all\n"
        f"compile_all(pathlib.Path({str(tmp_path)!r}))\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'timm', 'peft') if m in sys.modules)\n"
        "print('heavy:', heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {p.name for p in tmp_path.iterdir()} == {"training.yaml", "monthly-retrain.yaml"}


def test_a_bad_calibration_method_is_refused_before_any_step(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """kfp.local runs check_run_form first: calibration_method="bogus" fails the run there, naming the field and
    the allowed values, and data_fetch (or anything after it) never runs."""
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    with pytest.raises(RuntimeError, match="check-training-run-form"):
        training_pipeline(calibration_method="bogus", destination=str(tmp_path / "bundles"))
    out = capfd.readouterr()
    logs = out.out + out.err
    assert "calibration_method='bogus'" in logs
    assert "auto, identity, temperature, platt, beta, isotonic" in logs
    ran = {p.name for p in tmp_path.glob("*/*") if p.is_dir()}
    assert ran <= {"check-training-run-form"}, ran
    assert "Executing task 'data-fetch'" not in logs.replace("\x1b[96m", "").replace("\x1b[0m", "")
    assert not (tmp_path / "bundles").exists()


def test_run_form_descriptions_are_written_once_and_none_is_stale() -> None:
    """visionpipe/kfp/run_form.py describes each parameter once: shared entries are parameters of both pipelines,
    a pipeline's own entries are its parameters, and every parameter has exactly one description."""
    import inspect

    from visionpipe.kfp import run_form

    params = {
        "training": set(inspect.signature(training_pipeline.pipeline_func).parameters),
        "monthly-retrain": set(inspect.signature(monthly_retrain_pipeline.pipeline_func).parameters),
    }
    assert set(run_form.SHARED) <= params["training"] & params["monthly-retrain"]
    for name, own in run_form.PIPELINES.items():
        assert set(own) <= params[name], set(own) - params[name]
        assert not set(own) & set(run_form.SHARED), "described twice"
        assert params[name] <= set(own) | set(run_form.SHARED), params[name] - set(own) - set(run_form.SHARED)
