"""Small helpers for the local servers: free ports, waiting on conditions, stopping processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen | None = None,
    log: Path | None = None,
) -> None:
    """Polls ``check`` until it is true; fails early when ``proc`` dies, naming its log."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:.0f}s; see {log}")
        time.sleep(0.1)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as e:  # answering at all, even 401, means it is up
        return e.code < 500
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def start_process(
    args: list[str], log: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - the child owns it for its whole life
    try:
        return subprocess.Popen(
            args,
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # Ctrl-C in a terminal reaches us, not the servers directly
        )
    finally:
        out.close()


def stop_process(proc: subprocess.Popen | None, timeout: float = 20) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def kill_process(proc: subprocess.Popen | None) -> None:
    """SIGKILL, as an OOM kill or a power cut would: no clean-up code of the process runs."""
    if proc is None or proc.poll() is not None:
        return
    proc.kill()
    proc.wait()


def start_server(
    args: list[str], output: Path, cwd: Path, ready_url: str, what: str, log: Path
) -> subprocess.Popen:
    """Starts a server and waits until ``ready_url`` answers; never leaves a half-started
    one behind (stopped again when it dies or does not answer in time)."""
    proc = start_process(args, output, cwd)
    try:
        wait_until(lambda: http_ok(ready_url), timeout=120, what=what, proc=proc, log=log)
    except BaseException:
        stop_process(proc)
        raise
    return proc
