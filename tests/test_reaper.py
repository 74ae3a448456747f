"""Child processes die with their parent: a SIGKILLed `visionpipe run` leaves no task process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from visionpipe.kfp.reaper import TOKEN_ENV, processes_with_token

ROOT = Path(__file__).resolve().parents[1]


def _wait_for(predicate: object, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat").read_text().split()[2] if Path(f"/proc/{pid}/stat").exists() else "X"
    return status != "Z"


def test_grandchildren_die_when_the_parent_is_sigkilled(tmp_path: Path) -> None:
    # The parent guards its descendants, then starts `sh -c "sleep"` children the way kfp.local starts tasks.
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import subprocess, sys, time
            sys.path.insert(0, {str(ROOT)!r})
            from visionpipe.kfp.reaper import guard_descendants
            guard_descendants()
            children = [subprocess.Popen(["sh", "-c", "sleep 300; echo done"]) for _ in range(2)]
            print(" ".join(str(c.pid) for c in children), flush=True)
            time.sleep(300)
            """
        )
    )
    token = uuid.uuid4().hex
    env = {**os.environ, TOKEN_ENV: token}
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert parent.stdout is not None
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert _wait_for(lambda: len(processes_with_token(token)) >= 4, 10)  # 2 sh + 2 sleep (+ the parent)
        before = processes_with_token(token)
        assert all(_alive(pid) for pid in children)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_for(lambda: not processes_with_token(token), 10), processes_with_token(token)
        assert not any(_alive(pid) for pid in before)
    finally:
        if parent.poll() is None:
            parent.kill()


@pytest.mark.slow
def test_sigkilled_visionpipe_run_leaves_no_training_process(tmp_path: Path) -> None:
    overrides = '{"epochs": 500, "early_stopping.patience": 0}'  # a long run, killed while it trains
    token = uuid.uuid4().hex
    parent = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "visionpipe"),
            "run",
            "-p",
            f"recipe_overrides_json={overrides}",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--bundles-dir",
            str(tmp_path / "bundles"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
        env={**os.environ, TOKEN_ENV: token},
    )
    try:

        def training_started() -> bool:
            for pid in processes_with_token(token):
                try:
                    if b"supervised_train" in Path(f"/proc/{pid}/cmdline").read_bytes():
                        return True
                except OSError:
                    continue
            return False

        assert _wait_for(training_started, 240), "supervised_train never started"
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        assert _wait_for(lambda: not processes_with_token(token), 15), processes_with_token(token)
    finally:
        if parent.poll() is None:
            parent.kill()
