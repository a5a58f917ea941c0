"""The training recipe, top to bottom: config → data → model → loop → checkpoint → metrics.

    mmprep train --data OUT --output RUN [--params params.yaml]
    torchrun --nproc_per_node=N -m mmprep.cli train --data OUT --output RUN   (DDP)

CPU or CUDA (bf16 autocast, pinned memory, non-blocking copies, optional torch.compile).
Resumable exactly: RUN/checkpoints/last.pt holds model, optimizer, scheduler, step,
epoch, RNG states; the data stream of an epoch is a pure function of (seed, epoch), so a
resumed run skips the batches it already saw and continues bit for bit (on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mmprep.config import TrainConfig
from train import data as D
from train.evaluate import ablation, predictions
from train.model import Preprocess, build_model, modality_dropout
from train.progress import progress_bar


class NonFiniteError(FloatingPointError):
    """Training produced NaN/inf logits or loss: stop at once, naming the batch."""


# ---- config -------------------------------------------------------------------------------
def setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors/lists so the checkpoint loads with weights_only=True."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": _py_state(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _py_state(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- checkpoint ---------------------------------------------------------------------------
def save_atomic(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


# ---- the recipe ---------------------------------------------------------------------------
def train(data_dir: str, run_dir: str, cfg: TrainConfig, live_dir: str | None = None) -> dict[str, Any]:
    rank, world, device = setup_distributed()
    main = rank == 0
    seed_everything(cfg.seed)
    cuda = device.type == "cuda"

    # data
    spec = D.load_spec(data_dir)
    shapes = D.Shapes.from_spec(spec)
    train_urls = D.shard_urls(data_dir, spec, "train")
    if not train_urls:
        raise ValueError(f"{data_dir}: the train split has no shards")
    labeled = {k: v for k, v in spec.get("counts", {}).get("labels", {}).get("train", {}).items() if k != "<unlabeled>" and v}
    if not spec.get("labels") or ("counts" in spec and not labeled):
        raise ValueError(f"{data_dir}: the train split has no labeled samples (dataset.json labels: {len(spec.get('labels') or [])}): "
                         "nothing to learn; label the rows or set prepare.label.rules")
    if spec["splits"]["train"]["samples"] < cfg.batch_size * world:  # the loader would repeat samples to fill one batch
        raise ValueError(f"train.batch_size {cfg.batch_size}{f' x {world} ranks' if world > 1 else ''} is more than the "
                         f"{spec['splits']['train']['samples']} samples of {data_dir}'s train split: use a smaller batch_size")
    batches = D.batches_per_epoch(spec, "train", cfg.batch_size, world)
    total = cfg.max_steps or cfg.epochs * batches
    epochs = math.ceil(total / batches)

    # model
    model = build_model(spec, asdict(cfg)).to(device)
    prep = Preprocess(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, total))
    step, start_epoch, best = 0, 0, -1.0
    history: list[dict[str, float]] = []
    partial = [0.0, 0]
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    last_path = os.path.join(run_dir, "checkpoints", "last.pt")
    dataset = hashlib.sha256(D.read_bytes(data_dir, "dataset.json")).hexdigest()  # what the run trains on
    summary = _data_summary(spec)  # and its parts, to say what differs when resumed on other data
    if os.path.exists(last_path):
        ckpt = load_checkpoint(last_path)
        _check_same_run(ckpt.get("config", {}), cfg, last_path)
        if ckpt.get("dataset", dataset) != dataset:
            differs = _data_differs(ckpt.get("data_summary"), summary)
            raise ValueError(f"{last_path} was trained on other data ({data_dir}/dataset.json differs"
                             f"{f', run vs data: {differs}' if differs else ''}): use a new --output or delete it")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:  # a checkpoint from before the dataset was recorded, made on other data
            raise ValueError(f"{last_path} holds a model of another shape ({str(err).splitlines()[-1].strip()}): "
                             "trained on other data? use a new --output or delete it") from None
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, start_epoch, best = ckpt["step"], ckpt["epoch"], ckpt["best"]
        history = [row for row in ckpt.get("history", []) if row["epoch"] <= start_epoch]  # earlier epochs' curves
        partial = ckpt.get("partial", [0.0, 0])  # the interrupted epoch's loss sum and batch count so far
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        if step > total:
            raise ValueError(f"{last_path} is at step {step}, past the {total} steps these params make (train.epochs/max_steps): "
                             "use a new --output, or raise them to go on")
        saved = _finished_result(run_dir, step, total, start_epoch, epochs)
        if saved is not None:  # the same command again after it finished: nothing to do, its record kept
            if main:
                print(f"[train] {run_dir} is complete ({step} steps, {start_epoch} epochs): nothing to do", file=sys.stderr)
            if world > 1:
                dist.destroy_process_group()
            return saved
        if main:
            print(f"[train] resuming from {last_path} at step {step}, in epoch {start_epoch + 1}", file=sys.stderr)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(net) if cfg.compile else net
    live = _live(run_dir, live_dir) if main else None
    for row in history:  # a resumed run's metrics files hold exactly the epochs its checkpoint validated
        _log_live(live, row)
    speed = {"samples": 0, "seconds": 0.0, "wait": 0.0}

    def epoch_batches(epoch: int):
        """The epoch's batches; with loader workers they start reading as soon as this is called."""
        stream = D.TrainStream(train_urls, shapes, cfg.batch_size, batches, cfg.seed, epoch, rank, world, cfg.shuffle_buffer,
                               spec.get("shards"))
        return iter(D.loader(stream, cfg.num_workers, cfg.seed + epoch, pin=cuda))

    # loop
    it = epoch_batches(start_epoch)
    for epoch in range(start_epoch, epochs):
        skip = step - epoch * batches  # batches of this epoch already trained before a resume
        upcoming = None
        net.train()
        timer = {"wait": 0.0, "start": time.perf_counter(), "samples": 0, "loss": 0.0, "n": 0}
        if skip > 0:  # a resumed epoch's train_loss averages all its batches, as an uninterrupted run's does
            timer["loss"], timer["n"] = partial
        bar = progress_bar(batches, f"[train] epoch {epoch + 1}/{epochs}", "batch", initial=max(0, skip)) if main else None
        for index in range(batches):
            t0 = time.perf_counter()
            batch = next(it)
            if index == batches - 1 and epoch + 1 < epochs:
                upcoming = epoch_batches(epoch + 1)  # next epoch's workers start during this step and validation
            if index < skip:
                continue
            if step >= total:  # resumed after the last step, before its validation: nothing left to train
                break
            timer["wait"] += time.perf_counter() - t0
            batch = D.to_device(batch, device, non_blocking=True)
            present = batch["present"] & model.use
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                image, audio, video = prep(batch, augment=cfg.augment)
                loss, logits = objective(fwd, image, audio, video, batch, present, cfg)
            check_finite(loss, logits, batch, step + 1, {"image": image, "audio": audio, "video": video})
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            timer["samples"] += batch["label"].shape[0] * world
            timer["loss"] += loss.detach()  # a tensor: no device sync per step
            timer["n"] += 1
            if bar is not None:
                bar.update()
                if step % cfg.log_every == 0:
                    bar.set_postfix(loss=f"{float(timer['loss']) / max(1, timer['n']):.4f}", refresh=False)
            elif main and (step % cfg.log_every == 0 or step == total):
                _progress(step, total, timer, scheduler.get_last_lr()[0], cuda)
            if step % cfg.checkpoint_every == 0 or step == total:
                # the epoch is not done until validated (the checkpoint after it): a run stopped in
                # between resumes here, skips the epoch's batches and validates it
                _checkpoint(last_path, model, optimizer, scheduler, step, epoch, best, world, main, asdict(cfg), history,
                            [float(timer["loss"]), timer["n"]], (dataset, summary))
            if step >= total:
                break
        if bar is not None:
            bar.close()
        _account(speed, timer, first=epoch == start_epoch, cuda=cuda)
        it = upcoming  # drops this epoch's loader and its (finished) workers

        # metrics (rank 0 validates on the whole val split; the others wait)
        if main:
            val = validate(model, prep, data_dir, spec, shapes, device) if spec["splits"]["val"]["samples"] else {}
            val_acc = val.get("accuracy", float("nan"))
            row = {"epoch": epoch + 1, "step": step, "train_loss": float(timer["loss"]) / max(1, timer["n"]), "val_accuracy": val_acc,
                   **{f"val_{k}": v for k, v in val.items() if k != "accuracy"}, "lr": scheduler.get_last_lr()[0]}
            history.append(row)
            alone = " ".join(f"{k} {v:.3f}" for k, v in val.items() if k != "accuracy" and v == v)  # NaN: no val sample has it
            print(f"[train] epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} val_accuracy {val_acc:.4f}"
                  + (f" (one modality: {alone})" if alone else ""), file=sys.stderr)
            _log_live(live, row)
            if val_acc > best or math.isnan(val_acc):
                best = val_acc if not math.isnan(val_acc) else best
                save_atomic({"model": model.state_dict()}, os.path.join(run_dir, "checkpoints", "best.pt"))
        _checkpoint(last_path, model, optimizer, scheduler, step, epoch + 1, best, world, main, asdict(cfg), history, [0.0, 0], (dataset, summary))
        if step >= total:
            break

    print(f"[train] rank {rank}/{world} done: {step} steps of {batches} batches per epoch", file=sys.stderr)
    result = {"steps": step, "epochs": epochs, "best_val_accuracy": best if best >= 0 else None, "world_size": world,  # None: no val split
              "samples_per_s": round(speed["samples"] / max(speed["seconds"], 1e-9), 1),
              "data_wait": round(speed["wait"] / max(speed["seconds"], 1e-9), 4)}
    if main:
        _export(run_dir, data_dir, model, cfg, spec, history, result)
        if live is not None:
            live.log_image("curves.png", os.path.join(run_dir, "curves.png"))  # renders offline, unlike vega HTML
            live.end()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return result


def _finished_result(run_dir: str, step: int, total: int, done_epochs: int, epochs: int) -> dict[str, Any] | None:
    """The result in train_config.json of a run whose checkpoint has trained and validated all
    it was asked to (None: something is left, or the run's record is missing)."""
    if step < total or done_epochs < epochs:
        return None
    try:
        with open(os.path.join(run_dir, "train_config.json"), encoding="utf-8") as f:
            return json.load(f)["result"]
    except (OSError, ValueError, KeyError):
        return None


def objective(net, image, audio, video, batch, present, cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of the fused logits (under modality dropout) over labeled samples, plus
    `aux_loss` × the unimodal heads' cross-entropy over every (labeled sample, present modality):
    each encoder is trained to classify alone, so none is left idle behind an easier one."""
    label = batch["label"]
    labeled = label >= 0
    target = label.clamp(min=0)
    dropped = modality_dropout(present, cfg.modality_dropout, cfg.single_modality)
    if cfg.aux_loss > 0:
        logits, aux = net(image, audio, batch["text"], video, present, with_aux=True, fused=dropped,
                          audio_frames=batch.get("audio_frames"))
    else:
        logits, aux = net(image, audio, batch["text"], video, present, fused=dropped,
                          audio_frames=batch.get("audio_frames")), None
    # a mean over labeled samples only: a batch without labels gives 0, not NaN (0/0)
    fused = F.cross_entropy(logits.float(), target, reduction="none")
    loss = torch.where(labeled, fused, 0.0).sum() / labeled.sum().clamp(min=1)
    if aux is not None:
        slots = aux.shape[1]
        per = F.cross_entropy(aux.float().flatten(0, 1), target.repeat_interleave(slots), reduction="none").view(-1, slots)
        use = present & labeled.unsqueeze(1)
        loss = loss + cfg.aux_loss * torch.where(use, per, 0.0).sum() / use.sum().clamp(min=1)
    return loss, logits


def check_finite(loss: torch.Tensor, logits: torch.Tensor, batch: dict[str, Any], step: int,
                 inputs: dict[str, torch.Tensor]) -> None:
    """One device sync per step; NaN/inf never trains on silently. The error names the samples
    whose input is non-finite (one bad sample spreads NaN to the whole batch via BatchNorm), else
    the samples with non-finite logits, else the whole batch."""
    rows = torch.isfinite(logits).all(dim=1)
    if bool(torch.isfinite(loss) & rows.all()):
        return
    n = len(rows)
    bad = [i for i, ok in enumerate(rows.tolist()) if not ok]
    what = f"logits in {len(bad)} of {n} samples" if bad else "loss"
    culprits: dict[int, list[str]] = {}
    for name, x in inputs.items():
        for i in (~torch.isfinite(x.float().flatten(1)).all(dim=1)).nonzero().flatten().tolist():
            culprits.setdefault(i, []).append(name)
    suspects = sorted(culprits) or bad or list(range(n))
    kinds = sorted({m for names in culprits.values() for m in names})
    keys = [batch["keys"][i] for i in suspects]
    shards = sorted({batch["shards"][i] for i in suspects})
    raise NonFiniteError(f"step {step}: non-finite {what}; " + (f"non-finite {'/'.join(kinds)} input in " if kinds else "")
                         + f"key(s) {', '.join(keys[:8])}" + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
                         + f" of shard(s) {', '.join(shards)}")


def validate(model, prep, data_dir, spec, shapes, device, split: str = "val") -> dict[str, float]:
    """Accuracy with every modality the sample has, and with each used modality alone (a lazy
    encoder shows as a low `<modality>_only` while training) — evaluate's own scoring."""
    model.eval()
    stream = D.EvalStream(D.shard_urls(data_dir, spec, split), shapes, 256, spec.get("shards"))
    pred = predictions(model, prep, stream, device, bf16=device.type == "cuda")
    model.train()
    labeled = pred["label"] >= 0
    out = {"accuracy": float((pred["all"][labeled] == pred["label"][labeled]).mean()) if labeled.any() else float("nan")}
    if sum(model.active) > 1:
        alone = ablation(pred)
        out.update({name: (acc if acc is not None else float("nan")) for (name, (acc, _, _)), used
                    in zip(alone.items(), model.active, strict=True) if used})
    return out


# knobs that may change between a run and its resumption
# (not num_workers: the loader's workers deal the shards, so the sample stream depends on it)
RESUMABLE_CHANGES = {"epochs", "max_steps", "log_every", "checkpoint_every", "compile"}


def _check_same_run(saved: dict[str, Any], cfg: TrainConfig, path: str) -> None:
    changed = sorted(k for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v)
    if changed:
        raise ValueError(f"{path} was written with other train params ({', '.join(changed)}): use a new --output or delete it")


def _data_summary(spec: dict[str, Any]) -> dict[str, Any]:
    """What `dataset.json` says of the data, small enough for every checkpoint: the labels, each
    modality's features (statistics as a digest), the samples per split and a digest of the shards."""
    def digest(value: Any) -> str:
        return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]

    features = {m: {k: (digest(v) if k in ("mean", "std") else v) for k, v in f.items()} for m, f in spec["features"].items()}
    return {"labels": list(spec["labels"]), "features": features,
            "samples": {split: s["samples"] for split, s in spec["splits"].items()},
            "shards": digest([spec.get("shards"), {split: s.get("shards") for split, s in spec["splits"].items()}])}


def _data_differs(saved: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """A few words on what differs between two `_data_summary`s ("image size 32 vs 64"), saved first;
    empty for a checkpoint from before the summary was recorded."""
    if not saved:
        return ""
    out = []
    if saved["labels"] != now["labels"]:
        out.append(f"labels ({len(saved['labels'])} vs {len(now['labels'])})" if len(saved["labels"]) != len(now["labels"])
                   else "labels")
    for m in sorted(set(saved["features"]) | set(now["features"])):
        a, b = saved["features"].get(m), now["features"].get(m)
        if a is None or b is None:
            out.append(f"{m} {'absent' if a is None else 'present'} vs {'present' if a is None else 'absent'}")
            continue
        out += [f"{m} {k}" if k in ("mean", "std") else f"{m} {k} {a.get(k)} vs {b.get(k)}"
                for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    out += [f"{split} samples {saved['samples'].get(split, 0)} vs {now['samples'].get(split, 0)}"
            for split in sorted(set(saved["samples"]) | set(now["samples"])) if saved["samples"].get(split, 0) != now["samples"].get(split, 0)]
    if not out and saved["shards"] != now["shards"]:
        out.append("the shards")
    return ", ".join(out) or "other fields (counts, params or versions)"


def _checkpoint(path, model, optimizer, scheduler, step, epoch, best, world, main, config, history, partial, dataset) -> None:
    """Every rank's RNG state goes into the one checkpoint written by rank 0, and the per-epoch
    history so far (a resumed run's train_config.json and curves cover every epoch)."""
    state = rng_state()
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, state)
        state = states
    if main:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": step, "epoch": epoch, "best": best, "rng": state, "config": config, "history": history,
                     "partial": partial, "dataset": dataset[0], "data_summary": dataset[1]}, path)


def _account(speed: dict, timer: dict, first: bool, cuda: bool) -> None:
    """Throughput over whole epochs; the first epoch of a process (warm-up) counts only if alone."""
    if cuda:
        torch.cuda.synchronize()
    if first and speed["seconds"]:
        return
    if not first and speed.get("warmup_only"):
        speed.update(samples=0, seconds=0.0, wait=0.0, warmup_only=False)
    speed["samples"] += timer["samples"]
    speed["seconds"] += time.perf_counter() - timer["start"]
    speed["wait"] += timer["wait"]
    speed["warmup_only"] = first


def _progress(step: int, total: int, timer: dict, lr: float, cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - timer["start"]
    print(f"[train] step {step}/{total} loss {float(timer['loss']) / max(1, timer['n']):.4f} lr {lr:.2e} "
          f"{timer['samples'] / elapsed:.0f} samples/s data-wait {timer['wait'] / elapsed:.1%}", file=sys.stderr, flush=True)


def _live(run_dir: str, live_dir: str | None):
    try:
        from dvclive import Live
    except ImportError:  # DVCLive is a dependency; without it we still write metrics.json
        return None
    return Live(dir=live_dir or os.path.join(run_dir, "dvclive"), save_dvc_exp=False, dvcyaml=None)  # starts empty


def _log_live(live, row: dict[str, float]) -> None:
    if live is None:
        return
    for key, value in row.items():
        if key in ("epoch", "step") or math.isnan(value):
            continue
        live.log_metric(f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}", value)
    live.next_step()


def _export(run_dir, data_dir, model, cfg, spec, history, result) -> None:
    """A self-contained run: weights, dataset.json, tokenizer, config, curves."""
    save_atomic(model.state_dict(), os.path.join(run_dir, "model.pt"))
    for name in ("dataset.json", "tokenizer.model"):
        try:
            data = D.read_bytes(data_dir, name)
        except FileNotFoundError:
            if name == "dataset.json":
                raise
            continue  # no text in the data (or a hand-made dataset): predict then takes no --text
        with open(os.path.join(run_dir, name), "wb") as f:
            f.write(data)
    with open(os.path.join(run_dir, "train_config.json"), "w", encoding="utf-8") as f:
        # strict JSON: NaN (no val sample has a modality, no val split) is written as null
        rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in history]
        json.dump({"train": asdict(cfg), "result": result, "history": rows}, f, indent=1)
    _plot(history, os.path.join(run_dir, "curves.png"))


def _plot(history: list[dict[str, float]], path: str) -> None:
    from mmprep.webpage import pyplot

    plt = pyplot()

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set(title="train loss", xlabel="epoch")
    b.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="black", label="all modalities")
    for key in sorted({k for h in history for k in h if k.endswith("_only")}):
        b.plot(epochs, [h.get(key, float("nan")) for h in history], linestyle="--", label=key[4:].replace("_", " "))
    b.set(title="val accuracy", xlabel="epoch", ylim=(0, 1))
    if len(b.get_lines()) > 1:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
