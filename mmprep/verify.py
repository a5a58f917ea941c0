"""`mmprep verify`: every shard of a prepared dataset against what `dataset.json` (and
`manifest.parquet`) recorded for it — bytes, sha256, sample count, members, keys.

Local directories and http(s):// URLs (read with the standard library, streamed: a shard is
never held whole in memory). Returns the problems found, one line each, naming the shard."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import urllib.request
from collections.abc import Iterator
from typing import Any, BinaryIO

from mmprep.shards import FIELDS, iter_shard

_CHUNK = 1 << 20


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def open_member(data_dir: str, name: str) -> BinaryIO:
    """A file of a prepared dataset, opened for streaming (OSError when it cannot be)."""
    if is_url(data_dir):
        try:
            return urllib.request.urlopen(data_dir.rstrip("/") + "/" + name, timeout=60)  # noqa: S310 - http(s) only
        except (OSError, ValueError) as err:
            raise OSError(f"cannot fetch ({err})") from err
    return open(os.path.join(data_dir.removeprefix("file://"), name), "rb")  # noqa: SIM115


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw, self.sha, self.size = raw, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.raw.read(len(buffer))
        self.sha.update(data)
        self.size += len(data)
        buffer[: len(data)] = data
        return len(data)

    def drain(self) -> None:
        """Read to the end (tar padding after the end-of-archive blocks counts too)."""
        while self.read(_CHUNK):
            pass


def _manifest_keys(data_dir: str) -> dict[str, list[str]] | None:
    """Keys per shard from manifest.parquet (None when it cannot be read)."""
    try:
        import pyarrow.parquet as pq

        with open_member(data_dir, "manifest.parquet") as f:
            table = pq.read_table(io.BytesIO(f.read()), columns=["key", "shard"], use_threads=False)  # no pool left at exit
    except Exception:  # noqa: BLE001 - reported by the caller as a missing manifest
        return None
    keys: dict[str, list[str]] = {}
    for key, shard in zip(table.column("key").to_pylist(), table.column("shard").to_pylist(), strict=True):
        keys.setdefault(shard, []).append(key)
    return keys


def _check_shard(data_dir: str, name: str, info: dict[str, Any], keys: list[str] | None) -> Iterator[str]:
    try:
        raw = open_member(data_dir, name)
    except OSError as err:
        yield f"{name}: missing or unreadable ({err.strerror or err})"
        return
    with raw:
        stream = HashingReader(raw)
        seen: list[str] = []
        try:
            for key, members in iter_shard(io.BufferedReader(stream, _CHUNK)):
                seen.append(key)
                unknown = sorted(set(members) - set(FIELDS))
                if unknown or "json" not in members:
                    yield f"{name}: sample {key!r} has members {sorted(members)} (needs json; allowed {list(FIELDS)})"
                    return
            stream.drain()
        except (tarfile.TarError, ValueError, OSError, EOFError) as err:
            yield f"{name}: corrupt shard ({type(err).__name__}: {err})"
            return
    if stream.size != info["bytes"]:
        yield f"{name}: {stream.size} bytes, dataset.json records {info['bytes']} (truncated or replaced)"
    elif stream.sha.hexdigest() != info["sha256"]:
        yield f"{name}: sha256 {stream.sha.hexdigest()[:16]}… differs from dataset.json's {info['sha256'][:16]}… (corrupted)"
    if len(seen) != info["samples"]:
        yield f"{name}: {len(seen)} samples, dataset.json records {info['samples']}"
    if len(set(seen)) != len(seen):
        yield f"{name}: a sample key appears more than once"
    if keys is not None and sorted(seen) != sorted(keys):
        missing, extra = sorted(set(keys) - set(seen)), sorted(set(seen) - set(keys))
        yield f"{name}: keys differ from manifest.parquet (missing {missing[:3]}, not in the manifest {extra[:3]})"


def verify(data_dir: str) -> tuple[list[str], dict[str, int]]:
    """(problems, totals) for a prepared dataset directory or URL."""
    try:
        with open_member(data_dir, "dataset.json") as f:
            spec = json.loads(f.read())
    except (OSError, ValueError) as err:
        return [f"dataset.json: missing or unreadable ({err}); is {data_dir} a directory written by mmprep prepare?"], {}
    problems: list[str] = []
    shards: dict[str, dict[str, Any]] = spec.get("shards", {})
    listed = {n for split in spec.get("splits", {}).values() for n in split.get("shards", [])}
    problems += [f"{n}: listed in a split but not in dataset.json's shard table" for n in sorted(listed - set(shards))]
    if not is_url(data_dir):
        local = {p for p in os.listdir(data_dir.removeprefix("file://")) if p.endswith(".tar")}
        problems += [f"{n}: a shard file that dataset.json does not list" for n in sorted(local - set(shards))]
    manifest = _manifest_keys(data_dir)
    if manifest is None:
        problems.append("manifest.parquet: missing or unreadable (keys not checked)")
    for name in sorted(shards):
        problems += _check_shard(data_dir, name, shards[name], None if manifest is None else manifest.get(name, []))
    totals = {"shards": len(shards), "samples": sum(s["samples"] for s in shards.values()), "bytes": sum(s["bytes"] for s in shards.values())}
    return problems, totals
