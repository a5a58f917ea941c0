"""Fuzz the decoders and manifest readers for longer than the test suite can (run by hand; the
README states what it ran and found).

    python benchmarks/fuzz.py --minutes 10                    # 10 minutes per family
    python benchmarks/fuzz.py --minutes 1 --families png wav  # some families only

Each family starts from valid files written here (PNG with alpha, JPEG with EXIF, WebP, WAV,
FLAC, MP3; JSONL and CSV manifests) and mutates them *structure-aware*: header fields
(dimensions, bit depths, channel counts, sample rates, chunk and segment lengths) set to
extremes with checksums fixed so the decoder gets past them, chunks dropped or repeated, plus
byte flips, cuts and truncation. Media go through the same child process prepare uses
(`pipelines.sandbox`: `row_timeout`, `row_memory_mb`), so a hang shows as a `timeout`, a memory
blow-up as `out_of_memory` (and the child's peak RSS), a crash or an unexpected exception as
`processing_error`. Manifest lines are parsed in-process. Inputs that hang, crash or raise are
saved under --keep for a test.
"""

from __future__ import annotations

import argparse
import collections
import io
import random
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402

from mmprep.config import PrepareConfig, load_params  # noqa: E402
from mmprep.records import RawRow, RecordError  # noqa: E402

EXTREMES32 = (0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 30, 65535, 65536)
EXTREMES16 = (0, 1, 0x7FFF, 0xFFFF, 0x8000)


def seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    cv2.circle(img, (32, 24), 12, (255, 255, 255), -1)
    rgba = np.dstack([img, np.full((48, 64), 200, np.uint8)])
    jpeg = cv2.imencode(".jpg", img)[1].tobytes()
    tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01" + struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + b"\x00" * 4
    app1 = b"Exif\x00\x00" + tiff
    out = {
        "png": cv2.imencode(".png", rgba)[1].tobytes(),
        "jpeg": jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1 + jpeg[2:],
        "webp": cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 80])[1].tobytes(),
    }
    t = np.arange(16000) / 16000
    wave = (0.4 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    for name, fmt, subtype in (("wav", "WAV", "PCM_16"), ("flac", "FLAC", "PCM_16"), ("mp3", "MP3", "MPEG_LAYER_III")):
        buf = io.BytesIO()
        sf.write(buf, np.stack([wave, wave[::-1]], axis=1), 16000, format=fmt, subtype=subtype)
        out[name] = buf.getvalue()
    return out


# ---- structure-aware mutations ---------------------------------------------------------------

def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    pos, chunks = 8, []
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunks.append((kind, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_build(chunks: list[tuple[bytes, bytes]], lengths: dict[int, int] | None = None) -> bytes:
    out = bytearray(b"\x89PNG\r\n\x1a\n")
    for i, (kind, body) in enumerate(chunks):
        out += struct.pack(">I", (lengths or {}).get(i, len(body))) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return bytes(out)


def mutate_png(data: bytes, r: random.Random) -> bytes:
    chunks = _png_chunks(data)
    op = r.choice(["ihdr", "length", "drop", "repeat", "idat", "generic"])
    if op == "ihdr":
        body = bytearray(chunks[0][1])
        field = r.choice([(0, 4), (4, 4), (8, 1), (9, 1), (10, 1), (11, 1), (12, 1)])
        value = r.choice(EXTREMES32) if field[1] == 4 else r.randrange(256)
        body[field[0] : field[0] + field[1]] = value.to_bytes(4, "big")[-field[1] :]
        chunks[0] = (chunks[0][0], bytes(body))
        return _png_build(chunks)
    if op == "length":
        return _png_build(chunks, {r.randrange(len(chunks)): r.choice(EXTREMES32)})
    if op in ("drop", "repeat") and len(chunks) > 2:
        i = r.randrange(1, len(chunks))
        chunks = chunks[:i] + chunks[i + 1 :] if op == "drop" else chunks[:i] + [chunks[i]] * r.randint(2, 50) + chunks[i:]
        return _png_build(chunks)
    if op == "idat":
        i = next(k for k, (kind, _) in enumerate(chunks) if kind == b"IDAT")
        body = bytearray(chunks[i][1])
        for _ in range(r.randint(1, 8)):
            body[r.randrange(len(body))] = r.randrange(256)
        chunks[i] = (b"IDAT", bytes(body))
        return _png_build(chunks)
    return mutate_bytes(data, r)


def mutate_jpeg(data: bytes, r: random.Random) -> bytes:
    out = bytearray(data)
    sof = data.find(b"\xff\xc0")
    op = r.choice(["sof", "length", "scan", "eoi", "generic"])
    if op == "sof" and sof > 0:
        at = sof + r.choice([5, 7, 9])
        out[at : at + 2] = r.choice(EXTREMES16).to_bytes(2, "big") if at != sof + 9 else bytes([r.randrange(256), out[at + 1]])
        return bytes(out)
    if op == "length":
        markers = [i for i in range(2, len(data) - 4) if data[i] == 0xFF and 0xC0 <= data[i + 1] <= 0xFE and data[i + 1] != 0xD9]
        if markers:
            at = r.choice(markers) + 2
            out[at : at + 2] = r.choice(EXTREMES16).to_bytes(2, "big")
            return bytes(out)
    if op == "scan":
        start = data.find(b"\xff\xda")
        for _ in range(r.randint(1, 16)):
            out[r.randrange(start + 4, len(out) - 2)] = r.randrange(256)
        return bytes(out)
    if op == "eoi":
        return bytes(out[: -r.randint(2, 200)])
    return mutate_bytes(data, r)


def mutate_webp(data: bytes, r: random.Random) -> bytes:
    out = bytearray(data)
    op = r.choice(["riff", "chunk", "dims", "generic"])
    if op == "riff":
        out[4:8] = struct.pack("<I", r.choice(EXTREMES32))
    elif op == "chunk":
        out[16:20] = struct.pack("<I", r.choice(EXTREMES32))
    elif op == "dims":
        at = r.choice([26, 28, 21, 22, 24])
        out[at : at + 2] = r.choice(EXTREMES16).to_bytes(2, "little")
    else:
        return mutate_bytes(data, r)
    return bytes(out)


def mutate_wav(data: bytes, r: random.Random) -> bytes:
    out = bytearray(data)
    fields = {"riff": (4, 4), "format": (20, 2), "channels": (22, 2), "rate": (24, 4), "byterate": (28, 4),
              "align": (32, 2), "bits": (34, 2), "data": (40, 4)}
    name = r.choice([*fields, "generic"])
    if name == "generic":
        return mutate_bytes(data, r)
    at, size = fields[name]
    value = r.choice(EXTREMES32 if size == 4 else EXTREMES16)
    out[at : at + size] = value.to_bytes(4, "little")[:size]
    return bytes(out)


def mutate_flac(data: bytes, r: random.Random) -> bytes:
    out = bytearray(data)
    op = r.choice(["streaminfo", "blocklen", "frames", "generic"])
    if op == "streaminfo":  # min/max block and frame sizes, rate/channels/bits, total samples
        at = r.randrange(8, 8 + 18)
        out[at] = r.choice([0, 0xFF, r.randrange(256)])
    elif op == "blocklen":
        out[5:8] = r.choice(EXTREMES32).to_bytes(4, "big")[1:]
    elif op == "frames":
        for _ in range(r.randint(1, 16)):
            out[r.randrange(42, len(out))] = r.randrange(256)
    else:
        return mutate_bytes(data, r)
    return bytes(out)


def mutate_mp3(data: bytes, r: random.Random) -> bytes:
    out = bytearray(data)
    frames = [i for i in range(len(data) - 4) if data[i] == 0xFF and data[i + 1] & 0xE0 == 0xE0]
    if frames and r.random() < 0.6:
        at = r.choice(frames)
        out[at + r.randint(1, 3)] = r.randrange(256)
        return bytes(out)
    return mutate_bytes(data, r)


def mutate_bytes(data: bytes, r: random.Random) -> bytes:
    out = bytearray(data)
    for _ in range(r.randint(1, 6)):
        op, at = r.choice(["flip", "cut", "dup", "truncate"]), r.randrange(max(len(out), 1))
        if op == "flip" and out:
            out[at] ^= 1 << r.randrange(8)
        elif op == "cut":
            del out[at : at + r.randint(1, 512)]
        elif op == "dup":
            out[at:at] = out[at : at + r.randint(1, 512)] * r.randint(1, 20)
        elif op == "truncate":
            del out[at:]
    return bytes(out)


MUTATORS = {"png": mutate_png, "jpeg": mutate_jpeg, "webp": mutate_webp, "wav": mutate_wav, "flac": mutate_flac, "mp3": mutate_mp3}


# ---- running ------------------------------------------------------------------------------

def peak_rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def fuzz_media(family: str, seconds: float, cfg: PrepareConfig, keep: Path, r: random.Random) -> dict:
    from mmprep import staged
    from pipelines.sandbox import Sandbox

    seed = seeds()[family]
    modality = "image" if family in ("png", "jpeg", "webp") else "audio"
    sandbox = Sandbox(cfg)
    counts: collections.Counter[str] = collections.Counter()
    peak, worst, started = 0.0, 0.0, time.monotonic()
    try:
        while time.monotonic() - started < seconds:
            data = MUTATORS[family](seed, r)
            row = RawRow(source=f"{family}:{counts.total()}", order=0, id="fuzz", **{modality: f"/fuzz.{family}"}, label="a")
            began = time.monotonic()
            reply = sandbox.run(row, {modality: data}, "f" * 32)
            worst = max(worst, time.monotonic() - began)
            if isinstance(reply, RecordError):
                reason = reply.reason
            else:
                entry = staged.complete(reply, "f" * 32, "fuzz", row.source, 0, cfg.text.max_tokens)  # as the worker does
                found = staged.peek(entry, "f" * 32, "fuzz", row.source, 0, cfg.text.max_tokens)
                reason = getattr(found, "reason", "ok")
            counts[reason] += 1
            if sandbox.proc is not None:
                peak = max(peak, peak_rss_mb(sandbox.proc.pid))
            if reason in ("timeout", "out_of_memory", "processing_error"):
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"{family}-{reason}-{counts[reason]}.bin").write_bytes(data)
    finally:
        sandbox.close()
    return {"inputs": counts.total(), "counts": dict(counts), "peak_rss_mb": peak, "slowest_s": worst}


def fuzz_manifests(seconds: float, keep: Path, r: random.Random) -> dict:
    from mmprep.manifest import csv_records, parse_jsonl_line

    line = b'{"id": "r1", "image": "a.png", "text": "caption \\u00e9", "label": "x", "meta": {"k": [1, 2.5, null]}}'
    csv = b'id,image,text,label\nr1,a.png,"a, quoted\ncaption",x\nr2,b.png,plain,y\n'
    counts: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        data = mutate_bytes(line if r.random() < 0.5 else csv, r)
        try:
            if data.startswith(b"{") or r.random() < 0.3:
                for part in data.split(b"\n"):
                    parse_jsonl_line(part, "m.jsonl:1", 0, "/base")
            else:
                list(csv_records(io.BytesIO(data).readlines()))
            counts["ok"] += 1
        except Exception as err:  # noqa: BLE001 - what we are looking for
            counts[f"raised {type(err).__name__}"] += 1
            keep.mkdir(parents=True, exist_ok=True)
            (keep / f"manifest-{counts.total()}.bin").write_bytes(data)
    return {"inputs": counts.total(), "counts": dict(counts), "peak_rss_mb": 0.0, "slowest_s": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="per family")
    parser.add_argument("--families", nargs="+", default=[*MUTATORS, "manifest"], choices=[*MUTATORS, "manifest"])
    parser.add_argument("--params", default=str(ROOT / "params.yaml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", default="fuzz-findings", help="where inputs that hang, blow up or crash are saved")
    args = parser.parse_args()
    cfg = load_params(args.params).prepare
    r, keep = random.Random(args.seed), Path(args.keep)
    print(f"{args.minutes:g} min per family; row_timeout {cfg.row_timeout:g}s, row_memory_mb {cfg.row_memory_mb}")
    print("| family | inputs | decoded | rejects (reason: count) | timeout | out_of_memory | processing_error | child peak RSS | slowest |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family in args.families:
        if family == "manifest":
            res = fuzz_manifests(args.minutes * 60, keep, r)
        else:
            res = fuzz_media(family, args.minutes * 60, cfg, keep, r)
        c = res["counts"]
        bad = ("timeout", "out_of_memory", "processing_error")
        rejects = ", ".join(f"{k} {v}" for k, v in sorted(c.items()) if k not in (*bad, "ok"))
        print(f"| {family} | {res['inputs']:,} | {c.get('ok', 0):,} | {rejects} | {c.get('timeout', 0)} | {c.get('out_of_memory', 0)} | "
              f"{c.get('processing_error', 0)} | {res['peak_rss_mb']:.0f} MiB | {res['slowest_s']:.2f}s |", flush=True)


if __name__ == "__main__":
    main()
