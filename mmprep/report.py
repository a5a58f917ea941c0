"""`mmprep report --data DIR`: one self-contained HTML page about a prepared dataset.

What is in the data (counts, rejects with examples, splits and labels against their targets),
what it looks like (distributions of the originals — images, audio, video —, token lengths against `max_tokens`, a
gallery with the stored image, the log-mel as a picture, the clip to listen to and the token
pieces), whether it is clean (near-duplicate groups with thumbnails, ignored links, no group in
two splits) and the dataset card (params, versions, shards with sha256).

Cost: the tables are read whole (light: ~100 bytes per row); the shards are streamed once,
reading only each sample's `.json` and `.tokens.npy` members (the tar's data is skipped
over) plus every member of the few samples shown. The gallery is a fixed-size sample, so the
page stays about the same size whatever the corpus (README: measured cost).
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from mmprep.shards import FIELDS, SPLITS, load_npy, parse_dataset_json, tar_entries
from mmprep.webpage import Raw, bars, cards, esc, histogram, img, page, pyplot, table

UNK_ID = 1  # mmprep.tokenizer: pad 0, unknown 1


def build_report(data: str, output: str | None = None, per_label: int = 3, max_labels: int = 24,
                 max_groups: int = 6, training: str | None = None) -> tuple[str, dict[str, Any]]:
    """Write the report (default DATA/report.html); returns its path and a few figures of it."""
    started = time.monotonic()
    done = os.path.join(data, "dataset.json")
    if not os.path.isfile(done):
        raise FileNotFoundError(f"{done} not found: not a complete prepared dataset (run mmprep prepare)")
    with open(done, "rb") as f:
        ds = parse_dataset_json(f.read(), done)
    path = os.path.join(data, "manifest.parquet")
    names = pq.read_schema(path).names
    missing = [c for c in ("key", "split", "label") if c not in names]
    if missing:
        raise ValueError(f"{path}: not an mmprep manifest (no column {', '.join(missing)})")
    has_groups = "group" in names  # datasets prepared before the column existed have none
    manifest = pq.read_table(path, columns=[c for c in ("key", "id", "split", "label", "group") if c in names])
    rejects_path = os.path.join(data, "rejects.parquet")
    rejects = pq.read_table(rejects_path).to_pylist() if os.path.exists(rejects_path) else []  # a hand-made dataset may have none
    keys, splits, labels = (manifest[c].to_pylist() for c in ("key", "split", "label"))
    groups = manifest["group"].to_pylist() if has_groups else list(keys)
    ids = manifest["id"].to_pylist() if "id" in names else list(keys)

    gallery = _gallery_keys(keys, labels, per_label, max_labels)
    group_sizes = Counter(groups)
    big_groups = [g for g, n in sorted(group_sizes.items(), key=lambda kv: (-kv[1], kv[0])) if n > 1][:max_groups]
    members_of: dict[str, list[str]] = defaultdict(list)
    for k, g in zip(keys, groups, strict=True):
        if g in big_groups and len(members_of[g]) < 8:
            members_of[g].append(k)
    wanted = set(gallery) | {k for g in big_groups for k in members_of[g]}
    scan = _scan(data, ds, wanted)

    output = output or os.path.join(data, "report.html")
    sections = [
        ("counts", "Counts", _counts_section(ds, rejects, splits, labels)),
        ("distributions", "Distributions", _distributions_section(ds, scan)),
        ("gallery", "Gallery", _gallery_section(data, ds, gallery, scan["samples"], dict(zip(keys, ids, strict=True)))),
        ("duplicates", "Duplicates and leakage", _duplicates_section(ds, rejects, keys, splits, groups, group_sizes, big_groups,
                                                                      members_of, scan["samples"]) if has_groups else
         "<p>This dataset's manifest.parquet has no <code>group</code> column (prepared by an older mmprep): "
         "prepare it again to see its split groups and the leakage check.</p>"),
        ("card", "Dataset card", _card_section(ds)),
    ]
    subtitle = f"{esc(os.path.abspath(data))} · {ds['counts']['kept']:,} samples in {len(ds['shards'])} shards"
    if training and os.path.exists(training):
        link = os.path.relpath(os.path.abspath(training), os.path.dirname(os.path.abspath(output)))
        subtitle += f' · <a href="{esc(link)}">training report</a>'
    text = page("mmprep dataset report", subtitle, sections)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, output)
    return output, {"bytes": len(text.encode()), "seconds": time.monotonic() - started, "gallery": len(gallery),
                    "audio_clips": text.count("<audio "), "images": text.count("<img ")}


def _gallery_keys(keys: list[str], labels: list[str | None], per_label: int, max_labels: int) -> list[str]:
    """The first `per_label` samples (in key order, i.e. a hash order: no input bias) of each
    of the most frequent `max_labels` labels."""
    by_label: dict[str, list[str]] = defaultdict(list)
    counts = Counter(label or "<unlabeled>" for label in labels)
    chosen = {label for label, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_labels]}
    for k, label in sorted(zip(keys, labels, strict=True)):
        name = label or "<unlabeled>"
        if name in chosen and len(by_label[name]) < per_label:
            by_label[name].append(k)
    return [k for name in sorted(by_label) for k in by_label[name]]


def _members(path: str, wanted: set[str]):
    """(key, field, bytes) of the `.json`/`.tokens.npy` members of one of our shards and of every
    member of the samples in `wanted`; the other members' data are seeked over."""

    def want(name: str) -> bool:
        key, _, fld = name.partition(".")
        return fld in ("json", "tokens.npy") or key in wanted

    with open(path, "rb") as f:
        for name, data in tar_entries(f, path, want):
            key, _, fld = name.partition(".")
            if "/" in name or fld not in FIELDS:
                raise ValueError(f"{path}: unexpected member {name!r} (not an mmprep shard?)")
            if data is not None:
                yield key, fld, data


def _scan(data: str, ds: dict, wanted: set[str]) -> dict[str, Any]:
    """One pass over the shards: a few numbers per sample (not its metadata dict: ~100 bytes a
    sample at 100k rows), token counts; all members of `wanted`."""
    numbers: dict[str, list] = defaultdict(list)
    formats: Counter = Counter()
    video_formats: Counter = Counter()
    unknown = total = 0
    samples: dict[str, dict[str, bytes]] = {}
    for name in ds["shards"]:
        for key, fld, blob in _members(os.path.join(data, name), wanted):
            if key in wanted:
                samples.setdefault(key, {})[fld] = blob
            if fld == "json":
                meta = json.loads(blob)
                if "image" in meta:
                    i = meta["image"]
                    numbers["width"].append(i["width"])
                    numbers["height"].append(i["height"])
                    formats[i.get("format", "?")] += 1
                if "audio" in meta:
                    a = meta["audio"]
                    numbers["duration"].append(a["duration"])
                    numbers["sample_rate"].append(a["sample_rate"])
                    numbers["channels"].append(a["channels"])
                if "video" in meta:
                    v = meta["video"]
                    numbers["video_width"].append(v.get("width") or 0)
                    numbers["video_height"].append(v.get("height") or 0)
                    numbers["video_duration"].append(v.get("duration") or 0.0)
                    numbers["video_fps"].append(v.get("fps") or 0.0)
                    video_formats[f"{v.get('format', '?')} / {v.get('codec', '?')}"] += 1
                if "text" in meta:
                    numbers["chars"].append(meta["text"]["chars"])
                    numbers["truncated"].append(bool(meta["text"].get("truncated")))
            elif fld == "tokens.npy":
                ids = load_npy(blob)
                numbers["tokens"].append(int(ids.shape[0]))
                unknown += int((ids == UNK_ID).sum())
                total += int(ids.shape[0])
    return {"numbers": numbers, "formats": formats, "video_formats": video_formats, "unknown": unknown, "tokens": total, "samples": samples}


def _counts_section(ds: dict, rejects: list[dict], splits: list[str], labels: list[str | None]) -> str:
    c = ds["counts"]
    out = [cards([("input rows", c["input_rows"]), ("kept", c["kept"]), ("rejected", c["rejected"]),
                  ("reject share", f"{c['reject_ratio']:.1%}"), ("split groups", c.get("groups", "—")),
                  *((f"{s} samples", c["splits"][s]) for s in SPLITS)])]
    charts = []
    if c["rejects"]:
        reasons = sorted(c["rejects"], key=lambda r: (-c["rejects"][r], r))
        charts.append(bars(reasons, {"rows": [c["rejects"][r] for r in reasons]}, "rejected rows by reason"))
        stages = sorted(c["rejects_by_stage"], key=lambda s: -c["rejects_by_stage"][s])
        charts.append(bars(stages, {"rows": [c["rejects_by_stage"][s] for s in stages]}, "rejected rows by stage"))
    names = sorted({label or "<unlabeled>" for label in labels})
    per = {s: Counter(label or "<unlabeled>" for label, sp in zip(labels, splits, strict=True) if sp == s) for s in SPLITS}
    if names:
        charts.append(bars(names, {s: [per[s][n] for n in names] for s in SPLITS}, "samples per label and split"))
    targets = ds["params"]["prepare"].get("splits", {})
    kept = max(1, c["kept"])
    balance = [(s, c["splits"][s], f"{c['splits'][s] / kept:.1%}", f"{targets.get(s, 0):.1%}") for s in SPLITS]
    out.append('<div class="charts">' + "".join(charts) + "</div>")
    out.append("<h3>Split balance against the targets (<code>prepare.splits</code>)</h3>")
    out.append(table(["split", "samples", "share", "target"], balance, numeric=(1, 2, 3)))
    if names:
        rows = []
        for n in names:
            total = sum(per[s][n] for s in SPLITS)
            rows.append([n, total, *(f"{per[s][n]} ({per[s][n] / max(1, total):.0%})" for s in SPLITS)])
        out.append("<h3>Labels per split</h3>" + table(["label", "samples", *SPLITS], rows, numeric=(1, 2, 3, 4)))
    if rejects:
        out.append("<h3>Rejected rows: a few examples per reason</h3>")
        by_reason: dict[str, list[dict]] = defaultdict(list)
        for r in rejects:
            by_reason[r["reason"]].append(r)
        rows = []
        for reason in sorted(by_reason, key=lambda k: (-len(by_reason[k]), k)):
            for r in by_reason[reason][:3]:
                dup = f" (duplicate of {r['duplicate_of']})" if r.get("duplicate_of") else ""
                rows.append([reason, r["stage"], r["source"], r["id"] or "—", (r["detail"] or "")[:200] + dup])
        out.append(table(["reason", "stage", "source", "id", "detail"], rows))
        out.append('<p class="sub">Every rejected row is in <code>rejects.parquet</code>; the reasons are listed in the '
                   "data contract (docs/data-contract.md in the mmprep repository).</p>")
    return "\n".join(out)


def _distributions_section(ds: dict, scan: dict) -> str:
    n = scan["numbers"]
    out, charts = [], []
    if n["width"]:
        charts.append(histogram(n["width"], "original image width", "pixels"))
        charts.append(histogram(n["height"], "original image height", "pixels"))
        charts.append(histogram([w / max(1, h) for w, h in zip(n["width"], n["height"], strict=True)],
                                "original aspect ratio", "width / height"))
        out.append(table(["image format", "samples"], sorted(scan["formats"].items(), key=lambda kv: -kv[1]), numeric=(1,)))
    if n["video_duration"]:
        charts.append(histogram(n["video_duration"], "original video duration", "seconds"))
        charts.append(histogram(n["video_fps"], "original video frame rate", "frames/s"))
        charts.append(histogram([min(w, h) for w, h in zip(n["video_width"], n["video_height"], strict=True)],
                                "original video frame, shorter side (as displayed)", "pixels"))
        out.append(table(["video container / codec", "clips"], sorted(scan["video_formats"].items(), key=lambda kv: -kv[1]),
                         numeric=(1,)))
    if n["duration"]:
        charts.append(histogram(n["duration"], "original audio duration", "seconds"))
        out.append(table(["sample rate (Hz)", "clips"], sorted(Counter(n["sample_rate"]).items()), numeric=(0, 1)))
        out.append(table(["channels", "clips"], sorted(Counter(n["channels"]).items()), numeric=(0, 1)))
    if n["chars"]:
        max_tokens = ds["features"].get("text", {}).get("max_tokens")
        lengths = n["tokens"]
        charts.append(histogram(n["chars"], "normalized text length", "characters"))
        charts.append(histogram(lengths, "token length", "tokens", bins=min(60, max(10, (max_tokens or 60))),
                                mark=max_tokens, mark_label=f"text.max_tokens = {max_tokens}"))
        at_cap = sum(x >= (max_tokens or 10**9) for x in lengths)
        truncated = sum(n["truncated"])
        unk = scan["unknown"] / max(1, scan["tokens"])
        out.append(table(["text figure", "value"], [
            ("texts", len(n["chars"])),
            ("token sequences at text.max_tokens (cut there)", f"{at_cap:,} ({at_cap / max(1, len(lengths)):.1%})"),
            ("texts cut at text.max_chars", f"{truncated:,} ({truncated / max(1, len(n['chars'])):.1%})"),
            ("unknown-token rate", f"{unk:.3%} of {scan['tokens']:,} tokens"),
        ]))
    if not (n["width"] or n["duration"] or n["chars"] or n["video_duration"]):
        return "<p>No samples.</p>"
    return '<div class="charts">' + "".join(charts) + "</div>\n" + "\n".join(out)


def _filmstrip(strip: bytes, frames: int) -> bytes | None:
    """A stored video strip (frames stacked vertically) laid out left to right, as JPEG."""
    import cv2

    from mmprep.image import decode_strip

    try:
        rgb = decode_strip(strip, frames)
    except ValueError:
        return None
    ok, jpg = cv2.imencode(".jpg", np.concatenate(list(rgb), axis=1)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    return jpg.tobytes() if ok else None


def _mel_picture(mel: np.ndarray, title: str) -> bytes:
    from mmprep.webpage import figure_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(2.6, 1.3))
    ax.imshow(mel.astype(np.float32), origin="lower", aspect="auto", cmap="magma")
    ax.set_axis_off()
    ax.set_title(title, fontsize=7)
    return figure_png(fig, dpi=70)


def _clip_wav(mel: np.ndarray, ds: dict) -> bytes | None:
    """The clip as its stored features describe it: Griffin-Lim from the log-mel (or MFCC),
    peak-normalized, 16-bit WAV. The original audio is not in the shards."""
    import librosa
    import soundfile as sf

    spec = ds["features"]["audio"]
    a = ds["params"]["prepare"]["audio"]
    feats = mel.astype(np.float32)
    inverse = librosa.feature.inverse
    power = librosa.db_to_power(feats) if spec["kind"] == "logmel" else inverse.mfcc_to_mel(feats, n_mels=a["n_mels"])
    magnitude = inverse.mel_to_stft(power, sr=spec["sample_rate"], n_fft=spec["n_fft"])
    # a fixed random start for the phases: the same features give the same clip (the page's bytes are reproducible)
    wave = librosa.griffinlim(magnitude, n_iter=16, hop_length=spec["hop_length"], n_fft=spec["n_fft"], random_state=0)
    peak = float(np.max(np.abs(wave))) if wave.size else 0.0
    if not np.isfinite(peak) or peak == 0:
        return None
    buf = io.BytesIO()
    sf.write(buf, (wave / peak * 0.9).astype(np.float32), spec["sample_rate"], format="WAV", subtype="PCM_16")
    return buf.getvalue()


def _gallery_section(data: str, ds: dict, gallery: list[str], samples: dict[str, dict[str, bytes]],
                     ids: dict[str, str]) -> str:
    if not gallery:
        return "<p>No samples.</p>"
    tokenizer = None
    if "text" in ds["features"]:
        import sentencepiece as spm

        tokenizer = spm.SentencePieceProcessor(model_file=os.path.join(data, ds["features"]["text"]["tokenizer"]))
    names = ds["labels"]
    cells = []
    for key in gallery:
        m = samples.get(key, {})
        meta = json.loads(m["json"]) if "json" in m else {}
        label = names[int(m["cls"])] if "cls" in m else "<unlabeled>"
        parts = [f"<b>{esc(label)}</b> · {esc(meta.get('split', ''))}<br><code>{esc(ids.get(key, key))}</code><br>"]
        if "jpg" in m:
            parts.append(img("image/jpeg", m["jpg"], f"image of {key}", width=96, height=96))
        if "mel.npy" in m:
            mel = load_npy(m["mel.npy"])
            parts.append(img("image/png", _mel_picture(mel, ds["features"]["audio"]["kind"]), f"features of {key}"))
            wav = _clip_wav(mel, ds)
            if wav is not None:
                from mmprep.webpage import data_uri

                parts.append(f'<audio controls preload="auto" src="{data_uri("audio/wav", wav)}"></audio>')
        if "video.jpg" in m and "video" in ds["features"]:
            strip = _filmstrip(m["video.jpg"], ds["features"]["video"]["frames"])
            if strip is not None:
                parts.append("<br>" + img("image/jpeg", strip, f"video frames of {key}", height=48))
        if "txt" in m:
            parts.append(f"<div>{esc(m['txt'].decode('utf-8'))}</div>")
        if "tokens.npy" in m and tokenizer is not None:
            pieces = [tokenizer.id_to_piece(int(i)) for i in load_npy(m["tokens.npy"])]
            parts.append('<div class="pieces">' + "".join(f"<span>{esc(p)}</span>" for p in pieces) + "</div>")
        cells.append('<div class="sample">' + "".join(parts) + "</div>")
    note = ('<p class="sub">The first samples (in key order) of each label, as stored: the JPEG, the audio features as a '
            "picture, the clip rebuilt from those features (Griffin-Lim: what the model hears, not the original recording), "
            "a video's sampled frames left to right, the normalized text and its token pieces.</p>")
    return note + '<div class="gallery">' + "".join(cells) + "</div>"


def _duplicates_section(ds: dict, rejects: list[dict], keys: list[str], splits: list[str], groups: list[str],
                        sizes: Counter, big: list[str], members_of: dict[str, list[str]],
                        samples: dict[str, dict[str, bytes]]) -> str:
    split_sets: dict[str, set[str]] = defaultdict(set)
    for g, s in zip(groups, splits, strict=True):
        split_sets[g].add(s)
    straddling = sorted(g for g, s in split_sets.items() if len(s) > 1)
    linked = sum(n for n in sizes.values() if n > 1)
    out = [cards([("split groups", len(sizes)), ("samples sharing a group", linked),
                  ("largest group", max(sizes.values(), default=0)),
                  ("exact duplicates rejected", ds["counts"]["rejects"].get("duplicate", 0)),
                  ("groups in two splits", len(straddling))])]
    if straddling:
        out.append(f'<p class="bad">✗ {len(straddling)} group(s) are in more than one split: {esc(", ".join(straddling[:10]))}</p>')
    else:
        out.append(f'<p class="ok">✓ No group is in two splits: samples sharing content ({esc(", ".join(ds["params"]["prepare"].get("link_modalities", [])))}, '
                   "near-duplicate images) are all in one split.</p>")
    if big:
        out.append("<h3>The largest groups</h3>")
        rows = []
        for g in big:
            thumbs = "".join(img("image/jpeg", samples[k]["jpg"], k, width=48, height=48)
                             for k in members_of[g] if "jpg" in samples.get(k, {}))
            rows.append([g, sizes[g], ", ".join(sorted(split_sets[g])), Raw(f'<span class="thumbs">{thumbs}</span>' or "—")])
        out.append(table(["group (its smallest key)", "samples", "split", "images"], rows, numeric=(1,)))
    ignored = ds.get("ignored_links") or []
    out.append("<h3>Ignored links</h3>")
    if ignored:
        out.append(table(["modality", "hash", "samples", "why"], [[i["modality"], i["hash"], i["samples"], i["why"]] for i in ignored],
                         numeric=(2,)))
    else:
        out.append("<p>None: every shared content link was used.</p>")
    dups = [r for r in rejects if r["reason"] in ("duplicate", "duplicate_id")][:10]
    if dups:
        out.append("<h3>Rejected duplicates (first 10)</h3>")
        out.append(table(["reason", "source", "id", "duplicate of"], [[r["reason"], r["source"], r["id"], r["duplicate_of"]] for r in dups]))
    return "\n".join(out)


def _card_section(ds: dict) -> str:
    out = ["<h3>Features</h3>"]
    for modality, spec in sorted(ds["features"].items()):
        shown = {k: (v if not isinstance(v, list) else f"[{len(v)} values]") for k, v in spec.items()}
        out.append(f"<p><b>{esc(modality)}</b>: <code>{esc(json.dumps(shown))}</code></p>")
    out.append(f"<h3>Labels ({len(ds['labels'])})</h3><p>" + esc(", ".join(f"{i}: {n}" for i, n in enumerate(ds["labels"]))) + "</p>")
    out.append("<h3>Shards</h3>")
    out.append(table(["shard", "samples", "bytes", "sha256"],
                     [[n, s["samples"], s["bytes"], Raw(f"<code>{esc(s['sha256'])}</code>")] for n, s in ds["shards"].items()],
                     numeric=(1, 2)))
    out.append("<h3>Params</h3><pre>" + esc(json.dumps(ds["params"], indent=1, ensure_ascii=False)) + "</pre>")
    out.append("<h3>Versions</h3>" + table(["library", "version"], sorted(ds.get("versions", {}).items())))
    return "\n".join(out)
