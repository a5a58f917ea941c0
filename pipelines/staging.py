"""Where processed rows wait between processing and the shard writer: a store of entries
(`mmprep.staged`) named by their content, under a directory Beam's FileSystems can reach.

With `--cache DIR` (the default, see `default_cache`) the store outlives the run and a
rerun reuses every entry whose row and params are unchanged; with `--no-cache` it is a
private directory inside the output that the run deletes when it finishes.

A pack is written before its index (the index atomically: a temporary name, then a rename),
and every entry carries its name and a checksum, so a killed run leaves at worst a pack
without an index (never looked at) or entries that fail their check and are processed
again — never one a later run trusts wrongly.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath

import numpy as np
from apache_beam.io.filesystems import FileSystems

from pipelines.files import is_local, join, put


def rows_dir(store_root: str, context: str) -> str:
    """The store's directory for one params digest."""
    return join(store_root, f"rows-{context[:16]}")


def default_cache() -> str:
    """$MMPREP_CACHE, else $XDG_CACHE_HOME/mmprep, else ~/.cache/mmprep."""
    if os.environ.get("MMPREP_CACHE"):
        return os.environ["MMPREP_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mmprep")


def hold_run(store_root: str, context: str, run: str):
    """Mark run `run` as alive in a local store: an exclusive lock on `.run-RUN.lock`, held
    (the open file returned) until the run ends or its process dies. None for remote stores."""
    import fcntl

    if not is_local(store_root):
        return None
    directory = rows_dir(store_root, context)
    os.makedirs(directory, exist_ok=True)
    lock = open(os.path.join(directory, f".run-{run}.lock"), "w")  # noqa: SIM115 - held for the run
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return lock


def release_run(lock) -> None:
    if lock is not None:
        os.unlink(lock.name)
        lock.close()


def sweep_dead_runs(store_root: str, context: str) -> int:
    """Delete the temporary files of runs that died (kill -9, a lost machine): their lock
    file is no longer held. Runs still alive, here or sharing the cache, are left alone.
    Returns the number of files removed."""
    import fcntl
    import glob

    directory = rows_dir(store_root, context)
    if not is_local(store_root) or not os.path.isdir(directory):
        return 0
    removed = 0
    for path in glob.glob(os.path.join(directory, ".run-*.lock")):
        run = os.path.basename(path)[len(".run-") : -len(".lock")]
        try:
            with open(path) as f:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # got it: nobody holds it, the run is dead
                pattern = f"*.tmp-{glob.escape(run)}*"
                for stale in glob.glob(os.path.join(directory, pattern)) + glob.glob(os.path.join(directory, "ranges", pattern)):
                    os.unlink(stale)
                    removed += 1
                os.unlink(path)
        except OSError:
            continue  # alive (locked) or already swept by another run
    return removed


class Store:
    """Entries in pack files: each processed input range appends its new entries to one
    `<root>/<context>/<pack>.pack` (one file per range, not per row: creating a file costs
    ~0.2–0.7 ms on ext4 here, as much as a quarter of processing a row) with a sidecar
    `<pack>.idx` (names, offsets, lengths) written after it. An entry's *location* is
    "pack:offset:length".

    Lookups by name use a compact index of every `.idx` of this context, loaded on first use:
    sorted 64-bit name prefixes and their locations (~24 bytes per cached row), and the
    content hashes of media files by their stat key (~72 bytes per file). A location's
    bytes are checked by the caller (each entry carries its name and a checksum), so a torn
    pack or a prefix collision is a miss, never a wrong hit."""

    def __init__(self, root: str, context: str, run: str = "") -> None:
        self.dir = rows_dir(root, context)
        self.run = run  # tags this run's temporary files (see sweep_dead_runs)
        self.local = is_local(root)
        self._index: tuple | None = None
        self._files: dict[str, object] = {}

    # -- writing ------------------------------------------------------------------------
    def write_pack(self, entries: list[tuple[str, bytes]], memo: list[tuple[str, str]] = ()) -> dict[str, str]:
        """Store entries (name, bytes) in one new pack, and the media hashes learned (stat key,
        sha256) in its index; returns name → location."""
        if not entries and not memo:
            return {}
        pack = hashlib.sha256("".join([name for name, _ in entries] + [k for k, _ in memo]).encode()).hexdigest()[:24]
        locations, index, offset = {}, [f"m {key} {sha}" for key, sha in memo], 0
        for name, data in entries:
            locations[name] = f"{pack}:{offset}:{len(data)}"
            index.append(f"{name} {offset} {len(data)}")
            offset += len(data)
        # the pack, then its index: both under temporary names first, so a killed run leaves at
        # worst tagged temporary files (swept by the next run) or a pack no index points to
        put(join(self.dir, f"{pack}.pack"), b"".join(data for _, data in entries), durable=False, tag=self.run)
        put(join(self.dir, f"{pack}.idx"), ("\n".join(index) + "\n").encode(), durable=False, tag=self.run)
        return locations

    def put_range(self, key: str, index_part: bytes, counts: dict[str, int], files: list[tuple[str, str | None]],
                  locations: list[str]) -> None:
        """Remember a whole range: its index part, counters, the stat keys of its media files
        and of the packs its rows' entry `locations` point to, in one file `ranges/KEY` (JSON
        line, the part, a checksum)."""
        packs = {p: self._pack_stat(p) for p in sorted({loc.split(":", 1)[0] for loc in locations})}
        head = json.dumps({"counts": counts, "files": files, "packs": packs}, ensure_ascii=True).encode()
        body = head + b"\n" + index_part
        put(join(self.dir, "ranges", key), body + hashlib.sha256(body).digest(), durable=False, tag=self.run)

    def get_range(self, key: str) -> tuple[bytes, dict[str, int]] | None:
        """A remembered range's (index part, counters) if every media file it read is unchanged
        (same stat key; a missing one still missing) and every pack its rows point to is as it was written (size and
        mtime); else None."""
        from pipelines.steps import stat_key

        try:
            with open(os.path.join(self.dir, "ranges", key), "rb") as f:
                blob = f.read()
        except OSError:
            return None
        body = blob[:-32]
        if len(blob) < 33 or hashlib.sha256(body).digest() != blob[-32:]:
            return None
        head, _, part = body.partition(b"\n")
        meta = json.loads(head)
        if any(stat_key(path) != key for path, key in meta["files"]):
            return None
        if any(self._pack_stat(pack) != stat for pack, stat in meta["packs"].items()):
            return None  # a pack rewritten, cut or gone since: its rows are looked up (and checked) one by one
        return part, meta["counts"]

    def _pack_stat(self, pack: str) -> list[int] | None:
        try:
            st = os.stat(os.path.join(self.dir, f"{pack}.pack"))
        except OSError:
            return None
        return [st.st_size, st.st_mtime_ns]  # not the inode: a cache copied with its times (cp -p) stays valid

    # -- reading ------------------------------------------------------------------------
    def media_hash(self, stat_key: str) -> str | None:
        """The content sha256 remembered for a file's stat key, or None."""
        if self._index is None:
            self._index = self._load_index()
        keys, shas = self._index[5], self._index[6]
        key = np.uint64(int(stat_key, 16))
        i = int(np.searchsorted(keys, key))
        return shas[i].decode() if i < len(keys) and keys[i] == key else None

    def lookup(self, name: str) -> str | None:
        """The location of a cached entry by name, or None."""
        if self._index is None:
            self._index = self._load_index()
        keys, packs, offsets, lengths, names = self._index[:5]
        key = np.uint64(int(name[:16], 16))
        i = int(np.searchsorted(keys, key))
        if i < len(keys) and keys[i] == key:
            return f"{names[packs[i]]}:{offsets[i]}:{lengths[i]}"
        return None

    def _load_index(self) -> tuple:
        pattern = join(self.dir, "*.idx")
        try:
            found = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
        except Exception:  # noqa: BLE001 - no such directory yet: an empty cache
            found = []
        keys, packs, offsets, lengths, names, stat_keys, shas = [], [], [], [], [], [], []
        for number, path in enumerate(found):
            names.append(posixpath.basename(path)[: -len(".idx")])
            with FileSystems.open(path, compression_type="uncompressed") as f:
                for line in f.read().decode(errors="replace").splitlines():
                    try:  # "NAME OFFSET LENGTH" or "m STATKEY SHA256"
                        first, second, third = line.split()
                        parsed = (int(second, 16), third) if first == "m" else (int(first[:16], 16), int(second), int(third))
                    except ValueError:
                        continue  # a damaged index line: its rows are processed again
                    if first == "m":
                        stat_keys.append(parsed[0])
                        shas.append(parsed[1])
                    else:
                        keys.append(parsed[0])
                        packs.append(number)
                        offsets.append(parsed[1])
                        lengths.append(parsed[2])
        order = np.argsort(np.array(keys, dtype=np.uint64), kind="stable")
        memo = np.argsort(np.array(stat_keys, dtype=np.uint64), kind="stable")
        return (
            np.array(keys, dtype=np.uint64)[order],
            np.array(packs, dtype=np.int32)[order],
            np.array(offsets, dtype=np.int64)[order],
            np.array(lengths, dtype=np.int64)[order],
            names,
            np.array(stat_keys, dtype=np.uint64)[memo],
            np.array(shas, dtype="S64")[memo],
        )

    def get(self, location: str) -> bytes | None:
        """An entry's bytes by location (None when its pack is gone or too short)."""
        pack, offset, length = location.rsplit(":", 2)
        f = self._files.get(pack)
        try:
            if f is None:
                path = join(self.dir, f"{pack}.pack")
                f = open(path, "rb") if self.local else FileSystems.open(path, compression_type="uncompressed")  # noqa: SIM115
                if len(self._files) >= 64:
                    self._files.pop(next(iter(self._files))).close()
                self._files[pack] = f
            f.seek(int(offset))
            data = f.read(int(length))
        except (FileNotFoundError, OSError):
            return None
        except Exception:  # noqa: BLE001 - a remote filesystem's own "not found" error
            return None
        return data if len(data) == int(length) else None

    def path(self, location: str) -> str:
        return f"{join(self.dir, location.split(':')[0] + '.pack')} at {location}"

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
