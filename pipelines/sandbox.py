"""Processing one row in a child process, so no single file can hang, exhaust or crash a
Beam worker: `prepare.row_timeout` bounds its wall time, `prepare.row_memory_mb` the memory
it may add, and a decoder that crashes (a segfault in a C library) costs that row only.

The worker keeps one child (`python -m pipelines.sandbox`) and sends it rows one at a time:
the row and its media bytes go down a pipe (pickled: the worker is trusted), the processed
row comes back as a partial staged entry (`mmprep.staged`, our own format: nothing the child
sends is ever unpickled; the worker adds its statistics and summary, `staged.complete`). A
child that overruns is killed and replaced (~0.5 s) and the row is a `timeout` reject; one
that dies is replaced and the row is a `processing_error` reject naming the signal. Neither
is cached: the next run tries the row again.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import threading
from typing import Any

from mmprep.config import PrepareConfig
from mmprep.records import RawRow, RecordError
from pipelines.reaper import child_env

_LEN = struct.Struct("<Q")
START_TIMEOUT = 300.0  # seconds for a child to import its libraries (a cold disk can be slow)


def _write_frame(f, data: bytes) -> None:
    for part in (_LEN.pack(len(data)), data):  # not concatenated: that copied every row's media once more
        view = memoryview(part)
        while view:  # a raw pipe may take part of it
            written = f.write(view)
            view = view[written if written is not None else 0 :]
    f.flush()


_PIPE_BYTES = 1 << 20  # Linux's default /proc/sys/fs/pipe-max-size for unprivileged processes


def _widen(pipe) -> None:
    """A 1 MiB pipe instead of 64 KiB (Linux): a batch's rows with their media are written
    ahead of the child, which then waits less on the feeding thread between two rows."""
    try:
        import fcntl

        fcntl.fcntl(pipe.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), _PIPE_BYTES)
    except (ImportError, OSError):
        pass  # elsewhere, or a lower system limit: the default size works, a little slower


def _read_frame(f) -> bytes | None:
    head = _read_exact(f, _LEN.size)
    if head is None:
        return None
    (size,) = _LEN.unpack(head)
    return _read_exact(f, size)


def _read_exact(f, size: int) -> bytes | None:
    """`size` bytes from a file (buffered or a raw pipe, which returns what is there), None at
    end of file."""
    chunks, got = [], 0
    while got < size:
        chunk = f.read(size - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class Sandbox:
    """A worker's child process for `process_row`; `run` returns a partial staged entry's
    bytes (`staged.complete` makes the entry) or the RecordError that stopped the row
    (timeout, memory, crash)."""

    def __init__(self, cfg: PrepareConfig) -> None:
        self.cfg = cfg
        self.proc: subprocess.Popen | None = None
        self.ready = False

    def start(self) -> None:
        """Start the child now, without waiting for it: it imports its libraries while the
        worker reads its first rows (`run_many` waits for it to be ready)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = subprocess.Popen(  # noqa: S603 - our own module, same interpreter
                [sys.executable, "-m", "pipelines.sandbox"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=child_env(),
                bufsize=0,  # raw pipes: select() sees every byte the child sent (no read-ahead buffer)
            )
            self.ready = False
            for pipe in (self.proc.stdin, self.proc.stdout):
                _widen(pipe)
            _write_frame(self.proc.stdin, pickle.dumps(self.cfg))

    def _ready(self) -> None:
        self.start()
        if self.ready:
            return
        if not select.select([self.proc.stdout], [], [], START_TIMEOUT)[0] or _read_frame(self.proc.stdout) != b"ready":
            self.close()
            raise RuntimeError("the row-processing child process did not start (see its error above)")
        self.ready = True

    def run(self, row: RawRow, loaded: dict[str, Any], name: str) -> bytes | RecordError:
        return self.run_many([(row, loaded, name)])[0]

    def run_many(self, items: list[tuple[RawRow, dict[str, Any], str]]) -> list[bytes | RecordError]:
        """Process rows in order, streamed: a thread feeds the child while its results are read
        (no round trip per row), and each result must come within row_timeout of the one
        before. After a timeout or a crash, the rows not done yet go to a fresh child."""
        out: list[bytes | RecordError] = []
        while len(out) < len(items):
            self._ready()
            proc, rest = self.proc, items[len(out) :]
            feeder = threading.Thread(target=self._feed, args=(proc, rest), daemon=True)
            feeder.start()
            for _ in rest:
                if not select.select([proc.stdout], [], [], self.cfg.row_timeout)[0]:
                    self.close()
                    out.append(RecordError("timeout", f"processing took longer than prepare.row_timeout={self.cfg.row_timeout:g}s"))
                    break
                reply = _read_frame(proc.stdout)
                if reply is None:
                    out.append(self._died())
                    break
                out.append(reply)
            feeder.join()
        return out

    @staticmethod
    def _feed(proc: subprocess.Popen, items: list) -> None:
        try:
            for item in items:
                _write_frame(proc.stdin, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        except (BrokenPipeError, OSError, ValueError):
            pass  # the child was stopped (timeout) or died: the reader reports it

    def _died(self) -> RecordError:
        code = self.proc.wait() if self.proc is not None else None
        self.proc = None
        if code is not None and code < 0:
            how = f"signal {signal.Signals(-code).name}" if -code in signal.valid_signals() else f"signal {-code}"
        else:
            how = f"exit status {code}"
        return RecordError("processing_error", f"the decoder crashed the row's process ({how})")

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _limit_memory(extra_mb: int | None) -> None:
    """Cap the child's data segment (heap and anonymous mappings) at what it uses now plus
    `extra_mb` (None: no cap): an allocation past it fails (MemoryError, OpenCV's
    out-of-memory error). Set per row, after its input is read: the cap is what processing
    may add to the row's own bytes."""
    import resource

    if extra_mb is None:
        resource.setrlimit(resource.RLIMIT_DATA, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        return
    with open("/proc/self/statm", "rb") as f:  # pages: size resident shared text lib data dirty
        data = int(f.read().split()[5]) * _PAGE
    limit = data + (extra_mb << 20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, resource.RLIM_INFINITY))


def _serve() -> None:
    from mmprep import staged
    from mmprep.process import limit_threads, process_row
    from mmprep.records import reject

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # a library's print must not corrupt the frames
    cfg: PrepareConfig = pickle.loads(_read_frame(stdin))  # noqa: S301 - from our own parent
    limit_threads()
    cap = sys.platform == "linux" and cfg.row_memory_mb > 0
    # decoders print their complaints about hostile files to stderr (libpng, libjpeg: "Corrupt
    # JPEG data ..."), thousands of lines on a dirty corpus; the row's reject detail says what
    # went wrong, so from here on the child's stderr is dropped
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    _write_frame(stdout, b"ready")
    while (frame := _read_frame(stdin)) is not None:
        row, loaded, name = pickle.loads(frame)  # noqa: S301 - from our own parent
        del frame
        try:
            if cap:
                _limit_memory(cfg.row_memory_mb)
            try:
                result = process_row(row, loaded, cfg)
            finally:
                if cap:
                    _limit_memory(None)
        except MemoryError:
            result = reject(row, RecordError("out_of_memory", f"needed more than prepare.row_memory_mb={cfg.row_memory_mb}"))
        except Exception as err:  # noqa: BLE001 - one exotic file must not stop the job
            text = f"{type(err).__name__}: {err}"
            if "Insufficient memory" in text or "Failed to allocate" in text:
                result = reject(row, RecordError("out_of_memory", f"needed more than prepare.row_memory_mb={cfg.row_memory_mb}"))
            else:
                result = reject(row, RecordError("processing_error", text))
        _write_frame(stdout, staged.encode(result, name, with_stats=False))  # completed by the worker (staged.complete)


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when the worker that started it dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when a child stops
    if sys.platform == "linux":
        _die_with_parent()
    _serve()
