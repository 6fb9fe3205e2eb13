"""Keep a long-running stage up: run it as a child process, restart it with backoff
when it exits without being asked to, stop it cleanly when asked.

``quotaflow supervise processor`` is what the local stack and the demo start; its PID
is the one in ``run/processor.pid``. The supervisor

- restarts the stage whenever it exits while nobody asked it to stop: a crash, a
  SIGKILL, the OOM killer, even exit code 0 (a worker that gave up is no better);
- waits before each restart with exponential backoff and jitter (Backoff), and restarts
  at once a stage that had stayed up for ``healthy_s`` (a crash after a good run is not a
  crash loop, and whatever the stage does waits for it), starting the backoff over;
- logs each start, exit and restart in the stage's log, and keeps its state (the
  stage's own pid, restarts, last exit, up since) in ``run/<stage>.state.json`` for
  ``quotaflow stack status`` and the tests;
- on SIGTERM or SIGINT passes SIGTERM to the stage, SIGKILLs it after
  ``stop_timeout_s``, and exits without restarting it;
- has the kernel send the stage SIGTERM if the supervisor itself dies
  (PR_SET_PDEATHSIG), so no stage runs on unsupervised and unrecorded;
- with ``standby_after_s`` (a stage whose work waits for its restart: the alerts stage),
  keeps a *standby*: a second run of the stage, started once the running one has been up
  that long, which imports what it needs and then waits (``wait_if_standby``) until the
  supervisor releases it, in place of a new process at the next restart. A restart then
  costs no Python start-up and imports (a second or two of a stage's restart on a busy
  machine). A standby that died is replaced by a fresh start.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import math
import random
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import orjson

log = logging.getLogger("quotaflow.supervise")

# Below Proc.stop's 30 s, so the stage is killed by its supervisor (and the supervisor
# exits cleanly) before `stack down` would kill the whole process group.
STOP_TIMEOUT_S = 20.0
_PR_SET_PDEATHSIG = 1
STANDBY_FD_ENV = "QUOTAFLOW_STANDBY_FD"  # a standby's end of the pipe its supervisor releases it by


def wait_if_standby() -> None:
    """In a stage, once it has imported what it needs: if started as a standby, wait until
    the supervisor releases it (one byte on the pipe); exit if the pipe closes without one
    (the supervisor stopped, or died)."""
    fd = os.environ.pop(STANDBY_FD_ENV, None)
    if fd is None:
        return
    try:
        released = os.read(int(fd), 1)
    finally:
        os.close(int(fd))
    if not released:
        raise SystemExit(0)


@dataclass
class Backoff:
    """Delay before each restart: ``initial_s`` doubled with each exit in a row, at most
    ``max_s``, with "equal jitter" (half of it fixed, half random), so stages that
    crash together don't restart in step and each delay in a row is longer than the
    last (the next one's fixed half is this one's whole ceiling)."""

    initial_s: float = 1.0
    max_s: float = 60.0
    healthy_s: float = 60.0
    failures: int = 0  # exits in a row, each after less than healthy_s up

    def after_exit(self, uptime_s: float, rand: Callable[[], float] = random.random) -> float:
        if uptime_s >= self.healthy_s:
            self.failures = 0  # it ran fine for a while: restart at once; a quick exit next starts the series
            if self.healthy_s > 0:  # 0: every run counts as healthy, so none is restarted at once (no hot loop)
                return 0.0
        self.failures += 1
        ceiling = min(self.max_s, self.initial_s * 2.0 ** min(self.failures - 1, 64))
        # strictly below the ceiling, which is the next delay's fixed half: (1 + r) / 2 with r
        # just below 1 rounds to the ceiling itself in floating point
        return min(ceiling / 2 * (1 + rand()), math.nextafter(ceiling, 0.0))


def signal_name(returncode: int) -> str | None:
    """The signal that ended a process (negative returncode), by name."""
    try:
        return signal.Signals(-returncode).name if returncode < 0 else None
    except ValueError:
        return None


def describe_exit(returncode: int) -> str:
    """``code 1``, or ``code -9 (SIGKILL)`` for a stage ended by a signal."""
    name = signal_name(returncode)
    return f"code {returncode} ({name})" if name else f"code {returncode}"


@dataclass
class State:
    """What the supervisor of one stage last wrote about it (epoch seconds)."""

    stage: str
    supervisor_pid: int
    status: str = "starting"  # starting | running | restarting | stopping | stopped
    pid: int | None = None  # the stage's own process, while it runs
    up_since: float | None = None
    restarts: int = 0
    last_exit: int | None = None  # returncode: negative is the signal that ended it
    last_exit_at: float | None = None
    next_start_at: float | None = None
    standby_pid: int | None = None  # a standby waiting to take over at the next restart

    def write(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(orjson.dumps(asdict(self)))
        os.replace(tmp, path)  # readers see the old state or the new one, never half

    @classmethod
    def read(cls, path: Path) -> State | None:
        try:
            doc = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            return None
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})


def _die_with_parent() -> Callable[[], None]:
    """preexec_fn for the stage: SIGTERM when the supervisor dies (Linux prctl)."""
    libc = ctypes.CDLL(None, use_errno=True)  # loaded before the fork, not in the child
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


class Supervisor:
    def __init__(self, name: str, argv: list[str], state_file: Path, backoff: Backoff,
                 stop_timeout_s: float = STOP_TIMEOUT_S, standby_after_s: float | None = None):
        self.name = name
        self.argv = argv
        self.state_file = state_file
        self.backoff = backoff
        self.stop_timeout_s = stop_timeout_s
        self.standby_after_s = standby_after_s
        self.state = State(stage=name, supervisor_pid=os.getpid())
        self._standby: tuple[asyncio.subprocess.Process, int] | None = None  # the process, our end of its pipe
        self._preparing: asyncio.Future | None = None

    async def _spawn(self, preexec: Callable[[], None]) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL, preexec_fn=preexec)

    async def _prepare_standby(self, preexec: Callable[[], None]) -> None:
        """A standby, once the running stage has been up standby_after_s (its imports would
        slow the running one's start)."""
        await asyncio.sleep(self.standby_after_s or 0.0)
        r, w = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(*self.argv, stdin=asyncio.subprocess.DEVNULL,
                                                        preexec_fn=preexec, pass_fds=(r,),
                                                        env={**os.environ, STANDBY_FD_ENV: str(r)})
        except BaseException:
            os.close(w)
            raise
        finally:
            os.close(r)
        self._standby = (proc, w)
        self._save(standby_pid=proc.pid)
        log.info("%s standby started (pid %d)", self.name, proc.pid, extra={"stage": self.name, "pid": proc.pid})

    def _release_standby(self) -> asyncio.subprocess.Process | None:
        """The standby, told to go on; None if there is none alive."""
        if self._standby is None:
            return None
        proc, w = self._standby
        self._standby = None
        try:
            if proc.returncode is not None:
                return None
            os.write(w, b"1")
            return proc
        except OSError:  # it died meanwhile (EPIPE)
            return None
        finally:
            os.close(w)

    async def _stop_standby(self) -> None:
        if self._preparing is not None:
            self._preparing.cancel()
            await asyncio.gather(self._preparing, return_exceptions=True)
        if self._standby is not None:
            proc, w = self._standby
            self._standby = None
            os.close(w)  # it reads the end of the pipe and exits
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            self._save(standby_pid=None)

    def _save(self, **changes) -> None:
        for key, value in changes.items():
            setattr(self.state, key, value)
        self.state.write(self.state_file)

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        self._save()
        preexec = _die_with_parent()
        while True:
            child = self._release_standby()
            standby = child is not None
            if child is None:
                child = await self._spawn(preexec)
            started = time.monotonic()
            self._save(status="running", pid=child.pid, up_since=time.time(), next_start_at=None,
                       standby_pid=None)
            log.info("%s started (pid %d)%s", self.name, child.pid, " from its standby" if standby else "",
                     extra={"stage": self.name, "pid": child.pid, "restart": self.state.restarts,
                            "standby": standby})
            if self.standby_after_s is not None and (self._preparing is None or self._preparing.done()):
                self._preparing = asyncio.ensure_future(self._prepare_standby(preexec))
            exited = asyncio.ensure_future(child.wait())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                await self._stop_standby()
                code = await self._stop(child, exited)
                stopping.cancel()
                self._save(status="stopped", pid=None, last_exit=code, last_exit_at=time.time())
                log.info("%s stopped (%s)", self.name, describe_exit(code),
                         extra={"stage": self.name, "exit_code": code})
                return 0
            stopping.cancel()
            code = exited.result()
            uptime = time.monotonic() - started
            delay = self.backoff.after_exit(uptime)
            restart = self.state.restarts + 1
            self._save(status="restarting", pid=None, restarts=restart, last_exit=code, last_exit_at=time.time(),
                       next_start_at=time.time() + delay)
            log.warning("%s exited with %s; restarting in %.1f s, restart %d",
                        self.name, describe_exit(code), delay, restart,
                        extra={"stage": self.name, "exit_code": code, "signal": signal_name(code),
                               "uptime_s": round(uptime, 3), "delay_s": round(delay, 4), "restart": restart})
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except TimeoutError:
                continue
            await self._stop_standby()
            self._save(status="stopped", next_start_at=None, standby_pid=None)
            log.info("%s not restarted: stop requested", self.name, extra={"stage": self.name})
            return 0

    async def _stop(self, child: asyncio.subprocess.Process, exited: asyncio.Future) -> int:
        """SIGTERM, then SIGKILL after stop_timeout_s; the stage's exit code."""
        self._save(status="stopping")
        log.info("stopping %s (pid %d): SIGTERM", self.name, child.pid, extra={"stage": self.name, "pid": child.pid})
        try:
            child.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            return await asyncio.wait_for(asyncio.shield(exited), self.stop_timeout_s)
        except TimeoutError:
            log.warning("%s did not stop within %g s; SIGKILL", self.name, self.stop_timeout_s,
                        extra={"stage": self.name, "pid": child.pid})
            try:
                child.kill()
            except ProcessLookupError:
                pass
            return await exited


def run(name: str, argv: list[str], state_file: Path, backoff: Backoff,
        stop_timeout_s: float = STOP_TIMEOUT_S, standby_after_s: float | None = None) -> int:
    return asyncio.run(Supervisor(name, argv, state_file, backoff, stop_timeout_s, standby_after_s).run())
