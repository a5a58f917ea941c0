"""Row processing in the prepare pipeline: read a range, reuse or process each row, stage it,
write the range's index part. Each step composes pure mmprep functions."""

from __future__ import annotations

import functools
import hashlib
import os
from collections import deque
from collections.abc import Iterable
from typing import NamedTuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from mmprep.config import PrepareConfig
from mmprep.process import limit_threads, process_row
from mmprep.records import RawRow, RecordError, Reject, Sample, reject
from pipelines.progress import WorkerCount
from pipelines.read import Range, load_media, read_range
from pipelines.sandbox import Sandbox
from pipelines.staging import Store

# rejects that depend on the machine or its load, not on the row: never cached
UNCACHED = ("processing_error", "timeout", "out_of_memory")
# rows go to the child in batches of at most BATCH_ROWS rows and BATCH_BYTES of media (three at
# a time: one in the child, one queued behind it, one being read). Each batch is a hand-over
# between threads (at 16 rows a batch the child waited ~2 ms at each: 1.4 s of a 16k-row run);
# batches grow from FIRST_BATCH at the start of a range, so the child gets its first rows
# while the worker reads the rest, also in the small ranges of a small corpus
BATCH_ROWS, BATCH_BYTES, FIRST_BATCH = 64, 32 << 20, 8


def counted(rej: Reject) -> Reject:
    Metrics.counter("rejects", rej.reason).inc()
    return rej


def _gathered(item: tuple[None, Iterable]) -> list:
    # without the seed; in a deterministic order whatever the runner delivered
    return sorted((x for x in item[1] if x is not None), key=repr)


class Gather(beam.PTransform):
    """All elements of a (small) PCollection as one list, also when it is empty: a GroupByKey
    on one key (seeded with a None), so every runner delivers each element exactly once (Beam
    2.77's DaskRunner did not, for `combiners.ToList`, see README Limits)."""

    def expand(self, pcoll):
        seed = pcoll.pipeline | "Seed" >> beam.Create([None])
        return (
            (pcoll, seed)
            | "WithSeed" >> beam.Flatten()
            | "OneKey" >> beam.Map(lambda x: (None, x))
            | "Group" >> beam.GroupByKey()
            | "List" >> beam.Map(_gathered)
        )


class Kept(NamedTuple):
    """A kept row's light record (one index-part row, a few hundred bytes): all the plan step
    sees of it. The payload (JPEG, features, text) waits in the staging store under `entry`."""

    key: str
    id: str
    order: int
    source: str
    label: str | None
    entry: str  # staging store entry name
    signature: str  # same iff every modality has the same content (exact duplicates)
    links: tuple[tuple[str, str], ...]  # (modality, content hash prefix) that tie samples to one split
    phash: int | None
    text: str | None  # the normalized text (≤ text.max_chars): the tokenizer's sample is drawn from these
    size: int  # upper bound of the bytes the sample adds to a shard
    vphash: int | None = None  # the perceptual hash of a video's sampled frames


class _OpenRange:
    """A range being read or processed: its rows' results so far and its new staged entries."""

    def __init__(self, part: str, key: str | None) -> None:
        self.part, self.key = part, key
        self.results: list = []  # per row, in input order: Kept or Reject (None while in the child)
        self.staged: list[tuple[str, bytes]] = []
        self.memo: list[tuple[str, str]] = []  # (stat key, content sha256) of the media files read
        self.files: list[tuple[str, str | None]] | None = []  # (path, stat key) of its media files; None: not reusable whole
        self.pending = 0  # batches still in the child
        self.read = False  # every row read and sent


class ProcessRangeFn(beam.DoFn):
    """Read one input range; for each row, load its media (FileSystems), then reuse its
    staged entry or decode/clean/normalize/featurize/label it and stage the result.

    The range's light records (`Kept` or Reject per row) go to one index part file under
    `work`; the element emitted is the part's path and row count."""

    def __init__(self, cfg: PrepareConfig, store: str, reuse: bool, work: str, progress: str | None = None, total: int = 0,
                 run: str = "", overlap: bool = True) -> None:
        from pipelines.progress import driver_token

        self.cfg, self.store_root, self.reuse, self.work, self.run = cfg, store, reuse, work, run
        # a range's last batches overlap the next range (the range is then emitted later, maybe
        # from finish_bundle); off for runners that drop finish_bundle's output (Beam 2.77's DaskRunner)
        self.overlap = overlap
        self.driver = driver_token()  # built in the driver: workers stop when it dies
        self.progress_dir, self.total = progress, total
        self.rows = Metrics.counter("read", "rows")
        self.kept = Metrics.counter("process", "kept")
        self.reused = Metrics.counter("process", "reused")
        self.fresh = Metrics.counter("process", "processed")
        self.ranges_reused = Metrics.counter("process", "ranges_reused")

    def setup(self) -> None:
        from mmprep.staged import context_digest

        limit_threads()
        self.context = context_digest(self.cfg)
        self.store = Store(self.store_root, self.context, self.run)
        self.progress = WorkerCount(self.progress_dir, self.total, self.driver)
        self.reading = _OpenRange("", None)  # the range whose rows look_up sees (its media files, hashes)
        self.sandbox = Sandbox(self.cfg) if self.cfg.row_timeout > 0 else None
        self.pool = None  # the one thread that streams batches to the child (see submit)
        self.running: deque = deque()  # (range, submitted batch), oldest first, across ranges
        self.open: deque[_OpenRange] = deque()  # ranges read whose rows are not all back yet, in order
        if self.sandbox is not None:
            from concurrent.futures import ThreadPoolExecutor

            self.pool = ThreadPoolExecutor(1, thread_name_prefix="mmprep-child")
        self.child_started = False  # started at the first row that needs processing (see process)

    def process(self, rng: Range):
        from pipelines.files import join, put

        part = join(self.work, "index", f"{rng.order:012d}.parquet")
        key = range_key(rng, self.context, self.cfg.text.max_tokens) if self.reuse and self.store.local else None
        found = self.store.get_range(key) if key else None
        if found is not None:  # the whole range as the last run left it: no row is parsed or looked up
            data, counts = found
            put(part, data, durable=False)
            for name, n in counts.items():
                Metrics.counter(*name.split(".", 1)).inc(n)
            self.ranges_reused.inc()
            self.progress.add(counts["read.rows"])
            yield {"part": part, "rows": counts["read.rows"]}
            return
        state = self.reading = _OpenRange(part, key)
        todo: list[tuple[int, RawRow, dict, str]] = []  # rows to process: (position, row, media, entry name)
        todo_bytes, batch = 0, FIRST_BATCH
        for row in read_range(rng, self.cfg.max_file_bytes):
            self.rows.inc()
            result = row if isinstance(row, Reject) else self.look_up(row)
            if not isinstance(result, Kept | Reject):  # not cached: processed in batches (bounded in rows and bytes)
                if self.pool is not None and not self.child_started:
                    # the child imports its libraries (~1 CPU-s) while this batch is read; not
                    # in setup: a rerun whose rows are all cached never starts one. From the
                    # thread that feeds it: the kernel's PR_SET_PDEATHSIG follows the thread
                    # that started a child, and a thread of Beam's pool may end before this worker
                    self.pool.submit(self.sandbox.start)
                    self.child_started = True
                todo.append((len(state.results), *result))
                todo_bytes += sum(len(v) for v in result[1].values() if isinstance(v, bytes | str))
                state.results.append(None)
                if len(todo) >= batch or todo_bytes >= BATCH_BYTES:
                    self.send(state, todo)
                    todo, todo_bytes, batch = [], 0, min(2 * batch, BATCH_ROWS)
                    yield from self.drain(1)
            else:
                self.done(result)
                state.results.append(result)
        if todo:
            self.send(state, todo)
        state.read = True
        self.open.append(state)
        # the range's last batches are still in the child: it is finished (its pack and index
        # part written, its element emitted) once they are back, while the child already works
        # on the next range's rows (waiting here left the child idle at every range's end)
        yield from self.drain(1 if self.overlap else 0)

    def send(self, state: _OpenRange, todo: list[tuple[int, RawRow, dict, str]]) -> None:
        self.running.append((state, self.submit(todo)))
        state.pending += 1

    def drain(self, keep: int):
        """Record submitted batches, oldest first, until `keep` are left in flight (one in the
        child and, once this thread sends the next, one queued behind it: the child never waits
        for this thread to record a finished batch); then finish the ranges that are complete."""
        while len(self.running) > keep:
            state, batch = self.running.popleft()
            self.collect(batch, state.results, state.staged)
            state.pending -= 1
        while self.open and self.open[0].read and not self.open[0].pending:
            yield self.finish_range(self.open.popleft())

    def finish_range(self, state: _OpenRange) -> dict:
        from pipelines.files import put, table_bytes
        from pipelines.plan import INDEX_SCHEMA, index_row

        results = state.results
        locations = self.store.write_pack(state.staged, state.memo)  # the new entries of this range: one file
        rows = [index_row(r if isinstance(r, Reject) or ":" in r.entry else r._replace(entry=locations[r.entry])) for r in results]
        data = table_bytes(rows, INDEX_SCHEMA)
        put(state.part, data, durable=False)
        if state.key and state.files is not None and not any(isinstance(r, Reject) and r.reason in UNCACHED for r in results):
            self.store.put_range(state.key, data, range_counts(results), state.files, [r["entry"] for r in rows if r.get("entry")])
        return {"part": state.part, "rows": len(rows)}

    def done(self, result: Kept | Reject) -> None:
        self.progress.add()
        if isinstance(result, Reject):
            counted(result)
        else:
            self.kept.inc()

    def start_bundle(self) -> None:
        # nothing of a bundle that failed half-way (its ranges are processed again by its retry)
        self.running.clear()
        self.open.clear()

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindow
        from apache_beam.utils.windowed_value import WindowedValue

        for out in self.drain(0):  # the bundle's ranges still open
            yield WindowedValue(out, GlobalWindow().max_timestamp(), (GlobalWindow(),))
        self.progress.flush()

    def teardown(self) -> None:
        self.store.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self.sandbox is not None:
            self.sandbox.close()
        from pipelines.reaper import exit_fast_when_done

        exit_fast_when_done()

    def look_up(self, row: RawRow) -> Kept | Reject | tuple[RawRow, dict, str]:
        """A row's cached light record (its `entry` a location), or what processing it needs:
        (row, its loaded media, its entry name)."""
        from mmprep import staged

        # media carried in the row (embedded in a Parquet file or a tar) have no file to stat:
        # they are hashed once loaded, like URIs
        paths = {m: p for m, p in row.media_paths() if p is not None and m not in row.media}
        stats = {m: stat_key(p) for m, p in paths.items()}
        reading = self.reading
        if reading.files is not None:  # a range can be reused whole only if all its media are local files (or missing ones)
            if row.media or any("://" in p for p in paths.values()):
                reading.files = None
            else:
                reading.files.extend((paths[m], k) for m, k in stats.items())
        if self.reuse and paths and not row.media and all(stats.values()):
            # unchanged files (same path, size, mtime, ctime, inode) have their content hash
            # remembered: a cached row is then reused without reading its media at all
            media = {m: self.store.media_hash(k) for m, k in stats.items()}
            if all(media.values()):
                found = self.reuse_entry(row, staged.entry_name(self.context, row, media))
                if found is not None:
                    return found
        loaded = load_media(row, self.cfg.max_file_bytes)
        # a file that could not be read enters the name as its error: once it is readable
        # (or another file) the name changes and the row is processed again
        media = {
            m: f"error:{v.reason}:{v.detail}" if isinstance(v, RecordError) else hashlib.sha256(v).hexdigest()
            for m, v in loaded.items()
            if not isinstance(v, str)
        }
        reading.memo.extend((k, media[m]) for m, k in stats.items() if k and isinstance(loaded.get(m), bytes))
        name = staged.entry_name(self.context, row, media)
        found = self.reuse_entry(row, name) if self.reuse else None
        return found if found is not None else (row, loaded, name)

    def submit(self, todo: list[tuple[int, RawRow, dict, str]]):
        """Start processing a batch in the child and return at once (a thread streams it there
        and reads the results): this thread goes on reading, hashing and looking up the next
        rows meanwhile. With row_timeout 0 (no child) the batch is processed here, now."""
        if self.sandbox is None:
            return todo, [self.process_here(row, loaded, name) for _, row, loaded, name in todo]
        return todo, self.pool.submit(self.sandbox.run_many, [(row, loaded, name) for _, row, loaded, name in todo])

    def collect(self, running, results: list, staged_rows: list[tuple[str, bytes]]) -> None:
        """Wait for a submitted batch; its records and counters are made in this thread (Beam's
        metrics belong to the bundle's thread)."""
        todo, outputs = running
        self.record(todo, outputs if isinstance(outputs, list) else outputs.result(), results, staged_rows)

    def process_rows(self, todo: list[tuple[int, RawRow, dict, str]], results: list, staged_rows: list[tuple[str, bytes]]) -> None:
        """Process rows (in the child process, streamed; or here with row_timeout 0) and put
        their light records or rejects at their positions; new entries go to `staged_rows`."""
        if todo:
            self.collect(self.submit(todo), results, staged_rows)

    def record(self, todo: list[tuple[int, RawRow, dict, str]], outputs: list, results: list, staged_rows: list[tuple[str, bytes]]) -> None:
        for (position, row, _, name), data in zip(todo, outputs, strict=True):
            self.fresh.inc()
            results[position] = result = self.light_record(row, name, data, staged_rows)
            self.done(result)

    def light_record(self, row: RawRow, name: str, data: bytes | RecordError, staged_rows: list[tuple[str, bytes]]) -> Kept | Reject:
        from mmprep import staged

        if isinstance(data, RecordError):
            return reject(row, data)
        if self.sandbox is not None:  # the child's entry: its statistics and summary are made here
            data, found = staged.finish(data, name, row.id, row.source, row.order, self.cfg.text.max_tokens)
        else:
            found = staged.peek(data, name, row.id, row.source, row.order, self.cfg.text.max_tokens)
        if isinstance(found, Reject):
            if found.reason not in UNCACHED:
                staged_rows.append((name, data))
            return found
        staged_rows.append((name, data))
        return Kept(*found[:5], name, *found[5:])

    def process_here(self, row: RawRow, loaded: dict, name: str) -> bytes | RecordError:
        """`process_row` in this process (prepare.row_timeout 0): the entry's bytes."""
        from mmprep import staged

        try:
            result = process_row(row, loaded, self.cfg)
        except Exception as err:  # noqa: BLE001 - one exotic file must not stop a million-row job:
            # it becomes a counted, visible reject (and the run fails past max_reject_ratio); not cached
            return RecordError("processing_error", f"{type(err).__name__}: {err}")
        summ = None if isinstance(result, Reject) else staged.summary(result, self.cfg.text.max_tokens)
        return staged.encode(result, name, summ)

    def reuse_entry(self, row: RawRow, name: str) -> Kept | Reject | None:
        from mmprep import staged

        location = self.store.lookup(name)
        data = self.store.get(location) if location else None
        if data is None:
            return None
        try:
            found = staged.peek(data, name, row.id, row.source, row.order, self.cfg.text.max_tokens)
        except (ValueError, KeyError, TypeError):
            return None  # torn or corrupted: process again, stage anew
        if found is None:
            return None
        self.reused.inc()
        return found if isinstance(found, Reject) else Kept(*found[:5], location, *found[5:])


# the code that turns a range's bytes into rows and rejects (parsing, ids, paths, read rejects):
# a whole range reused by its bytes alone would keep what older parsing code made of them
READ_CODE = ("mmprep/manifest.py", "pipelines/read.py")


@functools.cache
def read_code_digest() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digest = hashlib.sha256()
    for name in READ_CODE:
        try:
            with open(os.path.join(root, name), "rb") as f:
                source = f.read()
        except OSError:
            source = b""  # installed as bytecode only: the version in the context stands for it
        digest.update(name.encode() + b"\0" + hashlib.sha256(source).digest())
    return digest.hexdigest()


def range_key(rng: Range, context: str, max_tokens: int) -> str | None:
    """The name under which a whole range's result is cached: everything that decides it
    besides its media files (whose stat keys are checked on reuse) — the params digest, the
    range's place in the input and its bytes (a JSONL/CSV range; a directory range's listing).
    None for Parquet and WebDataset ranges (their media are in the input: rows are reused one
    by one)."""
    if rng.kind in ("jsonl", "csv"):
        with FileSystems.open(rng.path, compression_type="uncompressed") as f:
            f.seek(rng.start)
            content = hashlib.sha256(f.read(rng.stop - rng.start)).hexdigest()
    elif rng.kind == "directory":
        content = hashlib.sha256(repr(rng.rows).encode("utf-8", "surrogateescape")).hexdigest()
    else:
        return None
    # not the byte offsets: a longer line earlier in the file moves them, not the rows that follow
    place = repr((rng.kind, rng.path, rng.line, rng.order, rng.rows if rng.kind == "csv" else ()))
    blob = f"{context}|{read_code_digest()}|{max_tokens}|{place}|{content}"
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def range_counts(results: list[Kept | Reject]) -> dict[str, int]:
    """The Beam counters a reused range adds, as its first run counted them (less `processed`)."""
    counts = {"read.rows": len(results), "process.kept": 0, "process.reused": 0}
    for r in results:
        if isinstance(r, Reject):
            counts[f"rejects.{r.reason}"] = counts.get(f"rejects.{r.reason}", 0) + 1
        else:
            counts["process.kept"] += 1
        counts["process.reused"] += not (isinstance(r, Reject) and r.stage == "read")
    return counts


def stat_key(path: str) -> str | None:
    """64 bits of sha256(path, size, mtime, ctime, inode) of a local file (None for a URI or
    a file that cannot be stat'ed): what git's index uses to tell a file unchanged."""
    if "://" in path:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    key = f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}"
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def read_staged(store: Store, location: str, sample_id: str, source: str, order: int) -> Sample:
    """A kept row's payload back from the store; a missing entry is a clear error."""
    from mmprep import staged

    data = store.get(location)
    if data is None:
        raise OSError(f"staged row {store.path(location)} of {source} vanished during the run "
                      "(was the cache directory cleared?); run prepare again")
    sample = staged.decode(data, sample_id, source, order)
    if not isinstance(sample, Sample):
        raise OSError(f"staged row {store.path(location)} does not hold a kept sample")
    return sample
