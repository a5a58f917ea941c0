"""Stops the local worker processes of a prepare run whose driver was killed.

Beam's local runner starts its SDK worker processes from the driver; when the driver dies by
SIGKILL, a worker that has not been handed work yet waits for it forever (it keeps retrying
the dead driver's control channel), and one that has keeps processing its whole share.
`prepare` starts this watcher (`python -m pipelines.reaper PID`, a session of its own, so a
signal to the driver's process group does not reach it): it remembers the driver's
descendants twice a second, and when the driver is gone it kills the ones it saw (checked by
start time, so a reused pid is left alone) and those started since its last look (found by a
mark in their environment that they inherit from the driver), then exits. It exits at once when the driver ends
normally (the runner has stopped its workers by then).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time


def child_env() -> dict[str, str]:
    """The environment for `python -m pipelines.…` children: this checkout importable."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


def proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live, non-zombie process (Linux /proc), else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else (int(fields[1]), fields[19])


def descendants(root: int) -> dict[int, str]:
    """pid → start time of every process below `root`."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_stat(int(entry))
            if info:
                children.setdefault(info[0], []).append(int(entry))
                starts[int(entry)] = info[1]
    found, frontier = {}, [root]
    while frontier:
        for child in children.get(frontier.pop(), []):
            found[child] = starts[child]
            frontier.append(child)
    return found


def watch(driver: int, started: str) -> None:
    seen: dict[int, str] = {}
    while True:
        info = proc_stat(driver)
        if info is None or info[1] != started:
            break
        seen.update((pid, start) for pid, start in descendants(driver).items() if pid != os.getpid())
        seen = {pid: start for pid, start in seen.items() if (proc_stat(pid) or (0, ""))[1] == start}
        time.sleep(0.5)
    # and the ones started since the last look (a kill right after the runner started its
    # workers): they carry the driver's mark in their environment, inherited from it
    mark = f"{MARK}={driver}:{started}".encode()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and int(entry) not in seen:
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    marked = mark in f.read().split(b"\0")
            except OSError:
                continue
            info = proc_stat(int(entry)) if marked else None
            if info:
                seen[int(entry)] = info[1]
    for pid, start in seen.items():
        if (proc_stat(pid) or (0, ""))[1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


MARK = "MMPREP_PREPARE_DRIVER"  # set in the driver's environment: every process it starts inherits it


def exit_fast_when_done() -> None:
    """In a local Beam worker process of a prepare run (it carries the driver's MARK and is not
    the driver): once the process is ending normally, leave at once instead of finalizing the
    interpreter (module teardown, gRPC's: ~0.35 s a worker here, and Beam's local runner stops
    its workers one after the other, waiting for each to exit: 0.8 s of every 2-worker run).
    Called from a DoFn's teardown, which Beam runs when it shuts the worker down; the exit
    handler runs after Beam's harness has returned and its threads are joined. A process ending
    on an unhandled exception exits as usual, with its status."""
    mark = os.environ.get(MARK, "")
    if mark and mark.split(":")[0] != str(os.getpid()):
        atexit.unregister(_exit_now)  # once, however many DoFns call this
        atexit.register(_exit_now)


def _exit_now() -> None:
    if getattr(sys, "last_value", None) is not None:
        return  # an unhandled exception was printed: the usual exit, status 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(0)


def start() -> subprocess.Popen | None:
    """Watch this process (Linux: /proc); None elsewhere. Marks this process's environment,
    so the processes it starts from now on (Beam's workers) can be found once it is gone."""
    me = proc_stat(os.getpid()) if os.path.isdir("/proc") else None
    if me is None:
        return None
    os.environ[MARK] = f"{os.getpid()}:{me[1]}"
    return subprocess.Popen(  # noqa: S603 - our own module, same interpreter
        [sys.executable, "-m", "pipelines.reaper", str(os.getpid()), me[1]],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True,
        env=child_env(),
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]), sys.argv[2])
