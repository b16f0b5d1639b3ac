"""A throwaway PostgreSQL server (Debian's postgresql) in a folder of its own, on 127.0.0.1."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

from .procs import free_port, wait_until


def pg_bindir() -> Path:
    """Where initdb and pg_ctl live (Debian keeps them out of PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    raise FileNotFoundError("PostgreSQL is not installed (apt-get install postgresql)")


class Postgres:
    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.dir = state_dir
        self.data = state_dir / "data"
        self.port = port or free_port()
        self.bin = pg_bindir()
        # PostgreSQL refuses to run as root: then it runs as the postgres system user.
        self.as_root = os.geteuid() == 0

    def url(self, database: str = "lambda") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        cmd = [str(a) for a in args]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.as_root:
            shutil.chown(self.dir, "postgres", "postgres")
        if not (self.data / "PG_VERSION").exists():
            self._run(
                self.bin / "initdb", "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )
        self._run(
            self.bin / "pg_ctl", "-D", self.data, "-l", self.dir / "postgres.log", "-w", "start",
            "-o", f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off",
        )  # fmt: skip
        wait_until(self._ready, timeout=60, what="postgres", log=self.dir / "postgres.log")

    def _ready(self) -> bool:
        probe = subprocess.run(
            [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True,
        )
        return probe.returncode == 0

    def create_database(self, name: str) -> str:
        self._run(
            self.bin / "createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name
        )
        return self.url(name)

    def restart(self) -> None:
        """Stops the server at once (open connections cut, as a crash or failover would)
        and starts it again on the same port and data."""
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop")
        self.start()

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
