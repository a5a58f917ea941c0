"""Progress of the row-processing stage: rows/s over a recent window and an ETA.

Workers count the rows they finish into small files under a directory the driver made
(`WorkerCount`); a driver thread (`Reporter`) adds them up and prints a line now and then.
Runners whose workers sit on other machines cannot see that directory: there each worker
prints its own windowed rate instead (in the worker's log).
"""

from __future__ import annotations

import collections
import os
import socket
import sys
import threading
import time
import uuid


def _fmt_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Window:
    """Rate over the last `seconds` of (time, count) observations."""

    def __init__(self, seconds: float = 30.0) -> None:
        self.seconds = seconds
        self.points: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, now: float, count: int) -> float | None:
        self.points.append((now, count))
        while len(self.points) > 2 and now - self.points[1][0] >= self.seconds:
            self.points.popleft()
        (t0, c0), (t1, c1) = self.points[0], self.points[-1]
        return (c1 - c0) / (t1 - t0) if t1 > t0 and c1 > c0 else None


def line(done: int, total: int, rate: float | None) -> str:
    share = f" ({done / total:.0%})" if total else ""
    text = f"[mmprep prepare] processed {done:,}/{total:,} rows{share}"
    if rate:
        eta = f", ETA {_fmt_seconds(max(total - done, 0) / rate)}" if total else ""
        text += f", {rate:.0f} rows/s over the last {_WINDOW:.0f}s{eta}"
    return text


_WINDOW = 30.0


def driver_token() -> tuple[str, int, str]:
    """Who the driver is: (host, pid, the process's start time), taken in the driver."""
    return socket.gethostname(), os.getpid(), _start_time(os.getpid())


def _start_time(pid: int) -> str:
    from pipelines.reaper import proc_stat

    return (proc_stat(pid) or (0, ""))[1]


def driver_gone(token: tuple[str, int, str] | None) -> bool:
    """True when the driver ran on this machine and is dead (killed: its worker processes
    are orphans). Unknowable across machines: False there."""
    if not token or token[0] != socket.gethostname() or not token[2]:
        return False
    return _start_time(token[1]) != token[2]


class WorkerCount:
    """A worker's finished-row count, published to `directory` at most once a second — when
    the driver (on this machine) has died meanwhile, the worker process stops itself: the
    local runner hands a worker all its share of a stage at once, which an orphan would go on
    processing for minutes."""

    def __init__(self, directory: str | None, total: int, driver: tuple[str, int, str] | None = None) -> None:
        self.shared = bool(directory) and os.path.isdir(directory)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.path = os.path.join(directory, name) if self.shared else ""
        self.total, self.count, self.last, self.next_print = total, 0, 0.0, 0.0
        self.window = Window(_WINDOW)
        self.driver = driver

    def add(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if now - self.last < 1.0:
            return
        self.last = now
        if driver_gone(self.driver):
            print("[mmprep prepare] the driver process is gone (killed?): this worker stops", file=sys.stderr, flush=True)
            os._exit(3)
        if self.shared:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.write(str(self.count))
            os.replace(tmp, self.path)
            return
        rate = self.window.add(now, self.count)  # a worker on another machine: its own line every 30 s
        if rate and now >= self.next_print:
            self.next_print = now + _WINDOW
            print(f"[mmprep prepare] this worker processed {self.count:,} rows, {rate:.0f} rows/s", file=sys.stderr)

    def flush(self) -> None:
        self.last = 0.0
        self.add(0)


class Reporter:
    """Driver thread: sums the workers' counts every `every` seconds and prints a line
    when the count moved (windowed rate, ETA from the input's row count)."""

    def __init__(self, directory: str, total: int, every: float = 10.0, stream=None) -> None:
        self.directory, self.total, self.every = directory, total, every
        self.stream = stream or sys.stderr
        self.window = Window(_WINDOW)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mmprep-progress", daemon=True)
        self.printed = 0

    def done(self) -> int:
        total = 0
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):
                continue
            try:
                with open(os.path.join(self.directory, name)) as f:
                    total += int(f.read() or 0)
            except (OSError, ValueError):
                continue
        return total

    def _run(self) -> None:
        while not self.stop_event.wait(self.every):
            done = self.done()
            rate = self.window.add(time.monotonic(), done)
            if done and done != self.printed:
                self.printed = done
                print(line(done, self.total, rate), file=self.stream, flush=True)

    def __enter__(self) -> Reporter:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        self.thread.join()
