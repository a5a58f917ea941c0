"""`mmprep inspect OUT`: what a prepared dataset holds, in one screen."""

from __future__ import annotations

import os
from collections import Counter, defaultdict

import pyarrow.parquet as pq

from mmprep.shards import SPLITS, iter_shard, load_npy, parse_dataset_json


def inspect_dataset(out: str, examples: int = 3) -> str:
    done = os.path.join(out, "dataset.json")
    if not os.path.isfile(done):
        raise FileNotFoundError(f"{done} not found: not a complete prepared dataset (run mmprep prepare)")
    with open(done, "rb") as f:
        ds = parse_dataset_json(f.read(), done)
    manifest = pq.read_table(os.path.join(out, "manifest.parquet")).to_pylist()
    rejects = pq.read_table(os.path.join(out, "rejects.parquet")).to_pylist()
    lines = [f"{out}: {len(manifest)} samples kept, {len(rejects)} rejected of {ds['counts']['input_rows']} input rows"]
    lines += _splits_table(manifest, ds)
    lines += _rejects_table(rejects, examples)
    lines += _features(out, ds)
    if ds.get("ignored_links"):
        lines.append(f"\nignored links (too common to keep samples together): {len(ds['ignored_links'])}")
        lines += [f"  {link}" for link in ds["ignored_links"][:5]]
    return "\n".join(lines)


def _splits_table(manifest: list[dict], ds: dict) -> list[str]:
    labels = sorted({r["label"] or "<unlabeled>" for r in manifest})
    counts: dict[str, Counter] = defaultdict(Counter)
    for r in manifest:
        counts[r["split"]][r["label"] or "<unlabeled>"] += 1
    width = max([len(x) for x in labels] + [10])
    lines = ["", f"{'label':<{width}} " + " ".join(f"{s:>7}" for s in SPLITS)]
    for label in labels:
        lines.append(f"{label:<{width}} " + " ".join(f"{counts[s][label]:>7}" for s in SPLITS))
    lines.append(f"{'total':<{width}} " + " ".join(f"{sum(counts[s].values()):>7}" for s in SPLITS))
    lines.append("")
    for split in SPLITS:
        names = ds["splits"][split]["shards"]
        sizes = [ds["shards"][n]["bytes"] for n in names]
        if names:
            lines.append(
                f"{split}: {len(names)} shards, {sum(sizes) / 1e6:.1f} MB "
                f"(largest {max(sizes) / 1e6:.1f} MB, {max(ds['shards'][n]['samples'] for n in names)} samples)"
            )
    return lines


def _rejects_table(rejects: list[dict], examples: int) -> list[str]:
    if not rejects:
        return ["", "no rejects"]
    by_reason: dict[str, list[dict]] = defaultdict(list)
    for r in rejects:
        by_reason[r["reason"]].append(r)
    lines = ["", "rejects by reason:"]
    for reason in sorted(by_reason, key=lambda k: (-len(by_reason[k]), k)):
        rows = by_reason[reason]
        lines.append(f"  {reason:<20} {len(rows):>7}")
        for r in rows[:examples]:
            extra = f" (duplicate of {r['duplicate_of']})" if r.get("duplicate_of") else ""
            lines.append(f"      {r['source']}  id={r['id']!r}  {r['detail'][:80]}{extra}")
    return lines


def _features(out: str, ds: dict) -> list[str]:
    lines = ["", "features:"]
    for modality, spec in sorted(ds["features"].items()):
        summary = {k: v for k, v in spec.items() if k not in ("mean", "std")}
        lines.append(f"  {modality}: {summary}")
    shard = next((n for s in SPLITS for n in ds["splits"][s]["shards"]), None)
    if shard:
        key, members = next(iter_shard(os.path.join(out, shard)))
        shapes = {f: load_npy(b).shape for f, b in members.items() if f.endswith(".npy")}
        lines.append(f"  first sample {key} in {shard}: members {sorted(members)} array shapes {shapes}")
    return lines
