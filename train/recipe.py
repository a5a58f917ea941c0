"""The training recipe, top to bottom: config → data → model → loop → checkpoint → metrics.

    mmprep train --data OUT --output RUN [--params params.yaml]
    torchrun --nproc_per_node=N -m mmprep.cli train --data OUT --output RUN   (DDP)

CPU or CUDA (bf16 autocast, pinned memory, non-blocking copies, optional torch.compile).
Resumable exactly: RUN/checkpoints/last.pt holds model, optimizer, scheduler, step,
epoch, RNG states; the data stream of an epoch is a pure function of (seed, epoch), so a
resumed run skips the batches it already saw and continues bit for bit (on CPU).
"""

from __future__ import annotations

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
from train.model import FusionModel, Preprocess, modality_dropout


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
    batches = D.batches_per_epoch(spec, "train", cfg.batch_size, world)
    total = cfg.max_steps or cfg.epochs * batches
    epochs = math.ceil(total / batches)

    # model
    model = FusionModel(spec, cfg.fusion, cfg.width, cfg.text_encoder).to(device)
    prep = Preprocess(spec).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup_steps, total))
    step, start_epoch, best = 0, 0, -1.0
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    last_path = os.path.join(run_dir, "checkpoints", "last.pt")
    if os.path.exists(last_path):
        ckpt = load_checkpoint(last_path)
        _check_same_run(ckpt.get("config", {}), cfg, last_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, start_epoch, best = ckpt["step"], ckpt["epoch"], ckpt["best"]
        set_rng_state(ckpt["rng"][rank] if isinstance(ckpt["rng"], list) else ckpt["rng"])
        if main:
            print(f"[train] resuming from {last_path} at step {step} (epoch {start_epoch})", file=sys.stderr)
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    fwd = torch.compile(net) if cfg.compile else net
    live = _live(run_dir, live_dir, resume=step > 0) if main else None
    history: list[dict[str, float]] = []
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
        for index in range(batches):
            t0 = time.perf_counter()
            batch = next(it)
            if index == batches - 1 and epoch + 1 < epochs:
                upcoming = epoch_batches(epoch + 1)  # next epoch's workers start during this step and validation
            if index < skip:
                continue
            timer["wait"] += time.perf_counter() - t0
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            present = modality_dropout(batch["present"], cfg.modality_dropout)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                image, audio = prep(batch, augment=cfg.augment)
                logits = fwd(image, audio, batch["text"], present)
                loss = F.cross_entropy(logits.float(), batch["label"], ignore_index=-1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            timer["samples"] += batch["label"].shape[0] * world
            timer["loss"] += loss.detach()  # a tensor: no device sync per step
            timer["n"] += 1
            if main and (step % cfg.log_every == 0 or step == total):
                _progress(step, total, timer, scheduler.get_last_lr()[0], cuda)
            if step % cfg.checkpoint_every == 0 or step == total:
                _checkpoint(last_path, model, optimizer, scheduler, step, epoch + (index + 1 == batches), best, world, main, asdict(cfg))
            if step >= total:
                break
        _account(speed, timer, first=epoch == start_epoch, cuda=cuda)
        it = upcoming  # drops this epoch's loader and its (finished) workers

        # metrics (rank 0 validates on the whole val split; the others wait)
        if main:
            val_acc = validate(model, prep, data_dir, spec, shapes, device) if spec["splits"]["val"]["samples"] else float("nan")
            row = {"epoch": epoch + 1, "step": step, "train_loss": float(timer["loss"]) / max(1, timer["n"]), "val_accuracy": val_acc,
                   "lr": scheduler.get_last_lr()[0]}
            history.append(row)
            print(f"[train] epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} val_accuracy {val_acc:.4f}", file=sys.stderr)
            _log_live(live, row)
            if val_acc > best or math.isnan(val_acc):
                best = val_acc if not math.isnan(val_acc) else best
                save_atomic({"model": model.state_dict()}, os.path.join(run_dir, "checkpoints", "best.pt"))
        _checkpoint(last_path, model, optimizer, scheduler, step, epoch + 1, best, world, main, asdict(cfg))  # all ranks
        if step >= total:
            break

    print(f"[train] rank {rank}/{world} done: {step} steps of {batches} batches per epoch", file=sys.stderr)
    result = {"steps": step, "epochs": epochs, "best_val_accuracy": best, "world_size": world,
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


@torch.no_grad()
def validate(model, prep, data_dir, spec, shapes, device, split: str = "val") -> float:
    model.eval()
    correct = count = 0
    for batch in D.EvalStream(D.shard_urls(data_dir, spec, split), shapes, 256, spec.get("shards")):
        batch = {k: v.to(device) for k, v in batch.items()}
        image, audio = prep(batch, augment=False)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(image, audio, batch["text"], batch["present"]).argmax(1)
        labeled = batch["label"] >= 0
        correct += int((pred[labeled] == batch["label"][labeled]).sum())
        count += int(labeled.sum())
    model.train()
    return correct / count if count else float("nan")


# knobs that may change between a run and its resumption
RESUMABLE_CHANGES = {"epochs", "max_steps", "log_every", "checkpoint_every", "num_workers", "compile"}


def _check_same_run(saved: dict[str, Any], cfg: TrainConfig, path: str) -> None:
    changed = sorted(k for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES and k in saved and saved[k] != v)
    if changed:
        raise ValueError(f"{path} was written with other train params ({', '.join(changed)}): use a new --output or delete it")


def _checkpoint(path, model, optimizer, scheduler, step, epoch, best, world, main, config) -> None:
    """Every rank's RNG state goes into the one checkpoint written by rank 0."""
    state = rng_state()
    if world > 1:
        states: list[Any] = [None] * world
        dist.all_gather_object(states, state)
        state = states
    if main:
        save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "step": step, "epoch": epoch, "best": best, "rng": state, "config": config}, path)


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


def _live(run_dir: str, live_dir: str | None, resume: bool):
    try:
        from dvclive import Live
    except ImportError:  # DVCLive is a dependency; without it we still write metrics.json
        return None
    return Live(dir=live_dir or os.path.join(run_dir, "dvclive"), resume=resume, save_dvc_exp=False, dvcyaml=None)


def _log_live(live, row: dict[str, float]) -> None:
    if live is None:
        return
    for key in ("train_loss", "val_accuracy", "lr"):
        if not math.isnan(row[key]):
            live.log_metric(f"train/{key}" if key != "val_accuracy" else "val/accuracy", row[key])
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
        json.dump({"train": asdict(cfg), "result": result, "history": history}, f, indent=1)
    _plot(history, os.path.join(run_dir, "curves.png"))


def _plot(history: list[dict[str, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["train_loss"] for h in history], marker="o")
    a.set(title="train loss", xlabel="epoch")
    b.plot(epochs, [h["val_accuracy"] for h in history], marker="o", color="tab:green")
    b.set(title="val accuracy", xlabel="epoch", ylim=(0, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
