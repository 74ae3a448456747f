"""The one `visionpipe` entry: bad run-form values refused before anything runs or is contacted, the one -p
parser, one error style, and the progress lines / log files of a real kfp.local run.

(This module does not use ``from __future__ import annotations``: KFP reads the components' annotations.)
"""

import io
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from visionpipe.cli import main
from visionpipe.cli import main as entry_main
from visionpipe.kfp.local import LocalRun
from visionpipe.specs.params import CALIBRATION_METHODS, ParameterError, coerce, parse_assignments

BOGUS = ["-p", "calibration_method=bogus"]
ALLOWED = "one of " + ", ".join(CALIBRATION_METHODS)


# --------------------------------------------------------------------------------------------- refused up front
def test_run_refuses_a_bad_calibration_method_before_any_step_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_run(*_args: object, **_kwargs: object) -> LocalRun:
        raise AssertionError("the pipeline must not start")

    monkeypatch.setattr("visionpipe.kfp.local.run_pipeline", no_run)
    runs = tmp_path / "runs"
    assert main(["run", "--runs-dir", str(runs), "--bundles-dir", str(tmp_path / "b"), *BOGUS]) == 2
    err = capsys.readouterr().err
    assert err.startswith("visionpipe run: error: ")
    assert "calibration_method='bogus'" in err and ALLOWED in err
    assert not runs.exists()  # no run folder, no task folder


def test_run_names_every_bad_field_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--runs-dir", str(tmp_path / "runs"), *BOGUS, "-p", "alpha=2", "-p", "train_ratio=0.9"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "3 bad run-form values for training" in err
    assert "alpha=2.0" in err and "(0, 1)" in err and "sum to 1.2" in err
    assert not (tmp_path / "runs").exists()


def test_demo_refuses_a_bad_value_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--runs-dir", str(tmp_path / "runs"), *BOGUS]) == 2
    assert "visionpipe demo: error: " in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


class _Recorder(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"multi_user": false}')

    do_POST = do_GET

    def log_message(self, *_args: object) -> None:
        return


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    paths: list[str] = []
    handler = type("Handler", (_Recorder,), {"paths": paths})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", paths
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    "verb",
    [
        ["submit", "--pipeline", "training", "-p", "destination=s3://m/bundles"],
        ["schedule", "--pipeline", "monthly-retrain", "-p", "destination=s3://m/bundles"],
        ["submit", "--package", "visionpipe/kfp/compiled/training.yaml", "-p", "destination=s3://m/bundles"],
    ],
)
def test_submit_and_schedule_refuse_a_bad_value_before_any_request(
    verb: list[str], recorder: tuple[str, list[str]], capsys: pytest.CaptureFixture[str]
) -> None:
    host, paths = recorder
    assert main([*verb, *BOGUS, "--host", host]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"visionpipe {verb[0]}: error: ")
    assert "calibration_method='bogus'" in err and ALLOWED in err
    assert paths == []  # not even the healthz probe


def test_monthly_values_are_checked_by_the_monthly_table(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["schedule", "--dry-run", "-p", "destination=s3://m/b", "-p", "canary_percent=0", "-p", "data_month=10"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "canary_percent=0" in err and "[1, 99]" in err and "data_month='10'" in err and "YYYY-MM" in err


# --------------------------------------------------------------------------------------------- the -p parser
@pytest.mark.parametrize(
    ("kind", "raw", "expected"),
    [
        ("NUMBER_INTEGER", "3", 3),
        ("NUMBER_INTEGER", "-1", -1),
        ("NUMBER_DOUBLE", "0.25", 0.25),
        ("NUMBER_DOUBLE", "1", 1.0),
        ("BOOLEAN", "true", True),
        ("BOOLEAN", "False", False),
        ("BOOLEAN", "1", True),
        ("BOOLEAN", "0", False),
        ("STRING", "a=b", "a=b"),
        ("STRING", "", ""),
        ("LIST", '["0", "1"]', ["0", "1"]),
        ("STRUCT", '{"epochs": 2}', {"epochs": 2}),
    ],
)
def test_coercion_table(kind: str, raw: str, expected: object) -> None:
    value = coerce("x", raw, kind)  # type: ignore[arg-type]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    ("kind", "raw", "fragment"),
    [
        ("NUMBER_INTEGER", "1.5", "-p x='1.5'"),
        ("NUMBER_DOUBLE", "half", "parameter type NUMBER_DOUBLE"),
        ("BOOLEAN", "yes", "expected true or false"),
        ("LIST", "{}", "expected a JSON list"),
        ("STRUCT", "[1", "parameter type STRUCT"),
    ],
)
def test_coercion_refusals(kind: str, raw: str, fragment: str) -> None:
    with pytest.raises(ParameterError) as err:
        coerce("x", raw, kind)  # type: ignore[arg-type]
    assert fragment in str(err.value)


def test_parser_types_by_the_training_table() -> None:
    from visionpipe.specs.params import kinds

    pairs = ["seed=3", "alpha=0.2", "threshold_at_half=true", "recipe_overrides_json={}", "positive_class=a=b"]
    assert parse_assignments(pairs, kinds("training"), "training") == {
        "seed": 3,
        "alpha": 0.2,
        "threshold_at_half": True,
        "recipe_overrides_json": "{}",
        "positive_class": "a=b",
    }
    with pytest.raises(ParameterError, match="unknown pipeline parameter 'sed': training has no parameter"):
        parse_assignments(["sed=3"], kinds("training"), "training")


# --------------------------------------------------------------------------------------------- one entry
def test_the_package_entry_is_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert entry_main(["params"]) == 0
    out = capsys.readouterr().out
    assert "calibration_method = 'auto'" in out and ALLOWED in out
    assert entry_main(["params", "--pipeline", "monthly-retrain"]) == 0
    assert "canary_percent = 10" in capsys.readouterr().out


def test_one_error_style(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("visionpipe serve: error: give --bundle")
    assert main(["canary", "start", "--bundle-uri", "/local", "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("visionpipe canary: error: bundle uri=")
    assert main(["compile", "--image", "Bad Ref", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith("visionpipe compile: error: --image: ")


def test_no_other_main() -> None:
    import visionpipe.cli.canary
    import visionpipe.kfp.client

    assert not hasattr(visionpipe.kfp.client, "main") and not hasattr(visionpipe.cli.canary, "main")


# --------------------------------------------------------------------------------------------- progress
def _tiny_pipeline() -> object:
    from kfp import dsl
    from kfp.dsl import Metrics, Output

    @dsl.component(base_image="python:3.11", install_kfp_package=False)  # type: ignore[untyped-decorator]
    def step(x: int, metrics: Output[Metrics]) -> str:
        print("streamed output of step", x)
        metrics.log_metric("val_select_accuracy", 0.875)
        if x == 3:
            report = "\n".join(f"| check {i} | fail |" for i in range(20))
            raise ValueError("bundle validation failed: gate_accuracy\n\n" + report)
        return "s3://bucket/models/digits/v1"

    @dsl.pipeline(name="visionpipe-tiny-progress")  # type: ignore[untyped-decorator]
    def tiny(x: int = 1) -> str:
        first = step(x=1)
        second = step(x=x).after(first)
        return second.outputs["Output"]  # type: ignore[no-any-return]  # kfp is untyped

    return tiny


def test_progress_prints_one_line_per_task_and_writes_the_logs(tmp_path: Path) -> None:
    from visionpipe.kfp.local import run_pipeline
    from visionpipe.kfp.progress import TaskProgress

    out = io.StringIO()
    runs = tmp_path / "runs"
    result = run_pipeline(_tiny_pipeline(), {"x": 2}, runs, progress=TaskProgress(out, runs))  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, out.getvalue()
    for line in lines:
        assert line.split()[0] == "step" and " s  val_select accuracy 0.8750" in line
    assert result.outputs == {"Output": "s3://bucket/models/digits/v1"}  # the pipeline's outputs, by name
    assert result.run_dir is not None and result.run_dir.parent == runs.resolve()
    assert [t.name for t in result.tasks] == ["step", "step-2"] and all(t.ok for t in result.tasks)
    log = (result.run_dir / "logs" / "step-2.log").read_text()
    assert "streamed output of step 2" in log and "Got executor_input" in log
    assert result.log_path == result.run_dir / "logs" / "kfp-local.log"
    assert "Executing task 'step-2'" in result.log_path.read_text()  # the whole output, colour codes removed


def test_progress_names_the_failed_task_and_its_log(tmp_path: Path) -> None:
    from visionpipe.kfp.local import run_pipeline
    from visionpipe.kfp.progress import TaskProgress

    out = io.StringIO()
    runs = tmp_path / "runs"
    progress = TaskProgress(out, runs)
    with pytest.raises(RuntimeError, match="step"):
        run_pipeline(_tiny_pipeline(), {"x": 3}, runs, progress=progress)  # type: ignore[arg-type]
    lines = out.getvalue().splitlines()
    failed = progress.tasks[-1]
    assert failed.ok is False and failed.log_path is not None and failed.log_path.is_file()
    assert lines[1].split()[:3] == ["step", "FAILED", "after"] and str(failed.log_path) in lines[1]
    assert lines[2] == "    | ValueError: bundle validation failed: gate_accuracy"  # what failed comes first
    assert lines[3:] == [f"    | | check {i} | fail |" for i in range(11)]  # then at most 12 lines in all
    assert "streamed output of step 3" in failed.log_path.read_text()


def test_verbose_streams_everything(tmp_path: Path) -> None:
    from visionpipe.kfp.local import run_pipeline
    from visionpipe.kfp.progress import TaskProgress

    out = io.StringIO()
    runs = tmp_path / "runs"
    result = run_pipeline(_tiny_pipeline(), {"x": 2}, runs, progress=TaskProgress(out, runs, verbose=True))  # type: ignore[arg-type]
    text = out.getvalue()
    assert "Got executor_input" in text and "streamed output of step 2" in text
    assert result.log_path is not None and result.log_path.is_file()


def test_the_cli_starts_without_torch() -> None:
    """Building the whole parser (every verb's flags, `serve`'s included) imports neither torch nor numpy, so a
    refused `-p` value or `--help` answers at once; serving imports torch only when it serves."""
    code = (
        "import sys; from visionpipe.cli.app import build_parser; build_parser();"
        " heavy = sorted(m for m in ('torch', 'numpy', 'kserve') if m in sys.modules); print(heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stdout
