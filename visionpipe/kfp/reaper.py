"""Child processes die with `visionpipe run`, even when it is killed with SIGKILL.

kfp.local starts every task as `sh -c ... python -m kfp.dsl.executor_main ...` with a plain `subprocess.Popen`
(kfp/local/subprocess_task_handler.py, `run_local_subprocess`): no process group of its own and no
parent-death signal. A SIGKILL of the parent cannot be caught, so the training subprocess used to go on as an
orphan. `guard_descendants()` marks this process's environment with a random run token (inherited by every
task process and their children) and starts a small reaper in its own session. The reaper asks the kernel for
SIGTERM when its parent dies (`prctl(PR_SET_DEATHSIG)`, Linux), waits for that, then SIGKILLs every process
still carrying the token. On a normal exit the same happens, and finds nothing left.

The token selects only processes this run started; nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

TOKEN_ENV = "VISIONPIPE_RUN_TOKEN"
PR_SET_DEATHSIG = 1  # <linux/prctl.h>


_guarded: set[int] = set()  # PIDs (this process, after a fork maybe) whose reaper is running


def guard_descendants() -> str | None:
    """Start the reaper for this process (once); returns the run token, or None where /proc is missing.

    A token already in the environment is kept (a caller that set it can find the run's processes)."""
    if not Path("/proc/self/environ").exists():
        return None
    token = os.environ.get(TOKEN_ENV) or uuid.uuid4().hex
    if os.getpid() in _guarded:
        return token
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    subprocess.Popen(
        [sys.executable, "-m", "visionpipe.kfp.reaper", str(os.getpid()), token],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # a Ctrl-C to the terminal's group does not kill the reaper before its work
    )
    _guarded.add(os.getpid())
    os.environ[TOKEN_ENV] = token  # every child started from now on inherits it (/proc/<pid>/environ)
    return token


def processes_with_token(token: str) -> list[int]:
    """PIDs of the processes whose environment holds `VISIONPIPE_RUN_TOKEN=<token>`, other than this one."""
    marker = f"{TOKEN_ENV}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_token_processes(token: str, passes: int = 5, pause_s: float = 0.2) -> int:
    """SIGKILL every process carrying the token; a few passes catch children started meanwhile."""
    killed = 0
    for _ in range(passes):
        pids = processes_with_token(token)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed += 1
        time.sleep(pause_s)
    return killed


def _reap(parent: int, token: str) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == parent:  # else the parent died before prctl: reap at once
        signal.sigwait({signal.SIGTERM})
    kill_token_processes(token)


if __name__ == "__main__":
    _reap(int(sys.argv[1]), sys.argv[2])
