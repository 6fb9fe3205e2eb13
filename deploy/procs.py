"""Background processes of the local stack: start detached, record the PID, stop by PID.

A PID file holds the PID and a marker from the command line, so a PID reused
by an unrelated process after a reboot is never taken for ours. A process that
supervises another (deploy/supervise.py) keeps its state next to its PID file.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from quotaflow.core.errors import OperatorError


@dataclass(frozen=True)
class Proc:
    name: str
    run_dir: Path

    @property
    def pid_file(self) -> Path:
        return self.run_dir / f"{self.name}.pid"

    @property
    def state_file(self) -> Path:
        """Where a supervisor records its stage (deploy/supervise.py State)."""
        return self.run_dir / f"{self.name}.state.json"

    def pid(self) -> int | None:
        """PID of our running process, or None (a stale PID file is removed)."""
        try:
            pid_text, marker = self.pid_file.read_text().split("\n", 1)
            pid = int(pid_text)
        except (FileNotFoundError, ValueError):
            return None
        if marker.strip() and marker.strip() in _cmdline(pid) and not _is_zombie(pid):
            return pid
        self.pid_file.unlink(missing_ok=True)
        return None

    def start(self, argv: list[str], log_path: Path, marker: str, env: dict | None = None,
              cwd: Path | None = None) -> int:
        """Start argv in its own session (so it outlives us and can be stopped as a group)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, env=env, cwd=cwd)
        # Until exec completes, /proc/PID/cmdline still shows our own command line.
        wait_until(lambda: proc.poll() is not None or marker in _cmdline(proc.pid), 10, 0.01)
        self.pid_file.write_text(f"{proc.pid}\n{marker}\n")
        return proc.pid

    def stop(self, timeout_s: float = 30.0) -> bool:
        """SIGTERM, then SIGKILL after timeout_s. True if something was stopped."""
        pid = self.pid()
        if pid is None:
            return False
        stop_pid(pid, timeout_s)
        self.pid_file.unlink(missing_ok=True)
        return True


def stop_pid(pid: int, timeout_s: float, group: bool = True) -> None:
    """SIGTERM, then SIGKILL after timeout_s: to pid's process group (pid leads the
    group it was started in) or to pid alone."""
    send = _signal_group if group else _signal_one
    send(pid, signal.SIGTERM)
    if not wait_until(lambda: not alive(pid), timeout_s):
        send(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), 10.0)


def running_as(pid: int, marker: str) -> bool:
    """pid is alive and its command line contains marker (so not a reused pid)."""
    return marker in _cmdline(pid) and alive(pid)


def started_at(pid: int) -> float | None:
    """When pid started, in epoch seconds (to within a second), or None if it is gone."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (FileNotFoundError, IndexError, ValueError, StopIteration):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        os.kill(pid, sig)


def _signal_one(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    return Path(f"/proc/{pid}").exists() and not _is_zombie(pid)


def wait_until(cond: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def ensure_port_free(port: int, what: str, env_var: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OperatorError(f"port {port} for {what} is already in use by another process; "
                                 f"stop it or choose another port with {env_var}=PORT") from None
            raise


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
