"""The training loop, :func:`train`, and what it is made of: the trainable parts, the lr
schedule, the process group, the answer-token loss and the held-out loss.

Loss (per step, global batch G split over ranks r and micro-batches a):
L = Σ_{r,a} Σ_{answer tokens} −log p(x_t | x_<t, image) / N_G, N_G = answer tokens in G,
so DDP's (or FSDP's) gradient mean times the world size is exactly ∇L of the single-process run.
"""

from __future__ import annotations

import functools
import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from ddfm.config import to_dict
from ddfm.data import FailedImage, log_failed_images
from ddfm.model.checkpoint import load_model, read_meta, save_checkpoint
from ddfm.model.families import family_of, is_vision_language, part_of
from ddfm.runtime import is_main_process, local_rank, rank, resolve_device, world_size
from ddfm.runtime.provenance import versions
from ddfm.train import fsdp, lora
from ddfm.train.config import PARTS, TrainConfig, cluster_id, resolve_recipe
from ddfm.train.data import (
    IGNORE,
    Example,
    ballast_example,
    collate,
    encode_shard,
    length_groups,
    pad_token_id,
    rank_groups,
    sample_order,
)
from ddfm.train.state import TrainLog, check_out_dir, config_key

log = logging.getLogger(__name__)


def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.init`` on ``cfg.data``; write the checkpoint, ddfm.json and log.jsonl to ``cfg.out``."""
    # ---- setup: process group, data, model, optimizer, resume state
    world, device = setup_distributed(cfg.device, cfg.fsdp)
    micro = micro_batch_size(cfg, world)
    check_out_dir(Path(cfg.out), cfg.resume)
    torch.manual_seed(cfg.seed)
    # fp32 master weights whatever the checkpoint's dtype: AdamW on half-precision weights
    # loses small updates (--bf16 is the compute dtype, not the storage)
    model, processor = load_model(cfg.init, dtype=torch.float32)
    cfg = resolve_recipe(cfg, model.config)  # --train not given: the family's recipe
    examples, pixels, skipped, held_out = encode_data(cfg, processor, model)
    part_sizes = set_trainable(model, cfg.parts)
    if cfg.lora:  # the language part learns through adapters (ddfm/train/lora.py)
        if "language" not in cfg.parts:
            raise ValueError(f"--lora adapts the language model, but --train {'+'.join(cfg.parts)} does not train it")
        model = lora.add_adapters(model, cfg.lora, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets)
        part_sizes = {**part_sizes, "lora_adapters": lora.adapter_parameters(model)}
    params = place_model(model, cfg, device, world)
    pad_id = pad_token_id(processor)
    _dry_run(model, collate(examples[:1], pixels, pad_id), device, cfg.data)
    optimizer, scheduler = make_optimizer(params, cfg)
    run = TrainLog(cfg, config_key(cfg, examples))
    step = run.resume(model, optimizer, scheduler)
    ddp = DDP(model, find_unused_parameters=is_vision_language(model.config)) if world > 1 and not cfg.fsdp else model
    fwd = torch.compile(ddp) if cfg.compile else ddp
    ballast = ballast_example(examples) if cfg.fsdp else None
    # under FSDP, bf16 is its mixed-precision policy (fsdp.shard_model), not autocast
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.bf16 and not cfg.fsdp)
    evaluate = functools.partial(held_out_losses, model, held_out, pixels, pad_id, device, autocast)
    memory = None  # bytes of parameters, gradients and optimizer state per rank, after the first step
    run.start(step, len(examples), world, micro)
    if held_out and step == 0:
        run.write({"step": 0, "eval_loss": run.untimed(evaluate)})

    # ---- train
    while step < cfg.steps:
        batch = [examples[i] for i in sample_order(len(examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)]
        n_loss = sum(e.n_loss for e in batch)  # N_G: answer tokens of the global batch
        step_loss = torch.zeros((), device=device)
        groups = rank_groups(batch, rank(), world, micro, cfg.grad_accum, cfg.fsdp, ballast)
        for i, group in enumerate(groups):
            inputs = {k: v.to(device) for k, v in collate(group, pixels, pad_id).items()}
            labels = inputs.pop("labels")
            # DDP all-reduces gradients once per step; FSDP reduce-scatters after every
            # micro-batch, so that no rank ever holds the whole model's gradients
            sync = i == len(groups) - 1 or world == 1 or cfg.fsdp
            with (ddp.no_sync() if not sync else nullcontext()), autocast:
                loss = answer_nll(fwd(**inputs, use_cache=False).logits, labels)[0] / max(n_loss, 1)  # logits (B, T, V)
                if not loss.requires_grad and not cfg.fsdp:
                    # nothing trainable on this path (a text-only group under "align", projector
                    # only): a zero-weighted tie to the parameters, so every rank joins DDP's
                    # all-reduce (under FSDP every rank skips then, see rank_groups)
                    loss = loss + sum(p.view(-1)[0] for p in params) * 0.0
                if loss.requires_grad:
                    (loss * world).backward()  # DDP and FSDP average over ranks; we want the sum
            step_loss += loss.detach()
        if world > 1:
            dist.all_reduce(step_loss)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        if memory is None:  # once, while gradients and optimizer state exist
            memory = fsdp.memory_per_rank(model, optimizer, world)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = run.step_row(step, batch, n_loss, step_loss, lr)
        if held_out and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            row["eval_loss"] = run.untimed(evaluate)
        run.write(row)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            run.save(model, optimizer, scheduler, step)

    # ---- final save: resume state, then the whole model as one Hugging Face checkpoint
    run.finish()
    run.save(model, optimizer, scheduler, step)
    weights = fsdp.full_state_dict(model) if cfg.fsdp else None  # the whole model, on rank 0's CPU
    if cfg.lora:
        model = lora.merge_adapters(model)  # a plain checkpoint of the original class
    if is_main_process():
        meta = _metadata(cfg, world, run.counters, part_sizes, len(examples), skipped, memory)
        save_checkpoint(model, processor, cfg.out, meta=meta, processor_files=cfg.init, state_dict=weights)
        log.info("train: done, %d samples, %d tokens -> %s", run.counters["samples"], run.counters["tokens"], cfg.out)
    if world > 1 or cfg.fsdp:
        dist.barrier()
        dist.destroy_process_group()
    return Path(cfg.out)


# ---------------------------------------------------------------------------------------
# setup

def setup_distributed(device: str, sharded: bool = False) -> tuple[int, str]:
    """(world_size, device) — DDP or FSDP under torchrun (nccl on CUDA, gloo otherwise).

    ``device`` as :func:`ddfm.runtime.resolve_device` takes it; on CUDA each rank takes the
    GPU of its ``LOCAL_RANK``. FSDP needs a process group even in one process: a one-rank
    group on an in-memory store.
    """
    device = resolve_device(device)
    world = world_size()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif sharded and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or local_rank())
        torch.cuda.set_device(index)
        device = f"cuda:{index}"
    return world, device


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    """Samples per forward: ``batch / (accum * ranks)``, which must divide exactly."""
    micro = cfg.batch_size // (cfg.grad_accum * world)
    if micro * cfg.grad_accum * world != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum} "
                         f"x {world} rank(s)")
    return micro


def encode_data(cfg: TrainConfig, processor, model) -> tuple[list[Example], dict, list[FailedImage], dict]:
    """The shard's examples, every image's processor inputs (shard and held-out files), the
    shard's records left out (failed images, listed in ddfm.json) and the held-out examples
    of each ``--eval-data`` file by its stem. Rank 0 logs what was left out."""
    examples, pixels, skipped = encode_shard(cfg.data, processor, model, cfg.loss_on)
    if is_main_process():
        log_failed_images(f"train {cfg.data}", skipped, f"{cfg.out}/ddfm.json")
    held_out = {}
    for path in cfg.eval_data:
        ex, px, failed = encode_shard(path, processor, model, cfg.loss_on)
        if is_main_process():
            log_failed_images(f"train --eval-data {path}", failed, f"{cfg.out}/log.jsonl")
        held_out[Path(path).stem] = ex
        pixels.update(px)
    return examples, pixels, skipped, held_out


def set_trainable(model, parts: tuple[str, ...]) -> dict[str, int]:
    """Freeze everything but ``parts``; return the parameter count of each part.

    Parameters map to parts by the family's table (``ddfm.model.families.FAMILIES``); a
    parameter of no part, or a requested part the family lacks, is a ``ValueError``
    naming the family.
    """
    family = family_of(model.config)
    counts = {p: 0 for p in PARTS}
    for name, param in model.named_parameters():
        part = part_of(family, name)
        if part is None:
            raise ValueError(f"--train: parameter {name} of {type(model).__name__} belongs to no part of the "
                             f"{family.name} family ({', '.join(family.parts)})")
        counts[part] += param.numel()
        param.requires_grad_(part in parts)
    missing = [p for p in parts if counts[p] == 0]
    if missing:
        raise ValueError(f"--train {'+'.join(parts)}: the {family.name} family ({type(model).__name__}) has no "
                         f"{', '.join(missing)}; its parts are {', '.join(p for p in PARTS if counts[p])}")
    return counts


def place_model(model, cfg: TrainConfig, device: str, world: int) -> list:
    """Activation checkpointing, then shard (``--fsdp``) or move the model to ``device``;
    returns the trainable parameters (under FSDP the shards, taken before any forward: an
    FSDP root keeps the gathered ones after it)."""
    if cfg.activation_checkpointing:
        fsdp.enable_activation_checkpointing(model)
    if cfg.fsdp:
        fsdp.shard_model(model, device, world, cfg.bf16)  # before the optimizer: it holds the shards
    else:
        model.to(device)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list, cfg: TrainConfig):
    """AdamW (β = 0.9, 0.95) over ``params`` and its schedule (:func:`lr_lambda`)."""
    # foreach: one dispatch per list of FSDP's DTensor shards instead of one per tensor (3x faster on CPU)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  foreach=cfg.fsdp or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    return optimizer, scheduler


def lr_lambda(warmup: int, steps: int, min_ratio: float):
    """Multiplier of the peak lr at step s: linear warm-up, then cosine decay to ``min_ratio``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def _dry_run(model, batch, device, path) -> None:
    # one forward before training: a processor/model mismatch (image-token count, ids)
    # fails here with a clear message instead of after the first optimiser step
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    except (ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"{path}: the first example does not fit the init checkpoint: {err}") from None


# ---------------------------------------------------------------------------------------
# losses

def answer_nll(logits, labels):
    """Σ −log p(x_t | x_<t) over the answer tokens: logits (B, T, V), labels (B, T) with
    IGNORE outside answers. Returns (summed NLL (float32 scalar tensor), answer tokens)."""
    # position t predicts token t+1: shift the labels, not the (large) logits
    targets = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE)  # (B, T)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                            ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())


def held_out_loss(model, examples: list[Example], pixels: dict, pad_id: int, device, autocast,
                  batch_size: int = 32) -> float:
    """Mean answer-token NLL (nats) of held-out examples under ``model`` (no gradients).

    Every rank computes it on all examples (the same forward passes on each, as a sharded
    model needs); it reads no training state, so the training run is unchanged by it.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for i in range(0, len(examples), batch_size):
            for group in length_groups(examples[i:i + batch_size]):
                batch = {k: v.to(device) for k, v in collate(group, pixels, pad_id).items()}
                labels = batch.pop("labels")
                nll, n = answer_nll(model(**batch).logits, labels)
                total, count = total + float(nll), count + n
    model.train(was_training)
    return total / max(count, 1)


def held_out_losses(model, held_out: dict[str, list[Example]], pixels: dict, pad_id: int, device,
                    autocast) -> dict[str, float]:
    """``{file stem: held_out_loss}`` of every ``--eval-data`` file (log.jsonl ``eval_loss``)."""
    return {name: held_out_loss(model, ex, pixels, pad_id, device, autocast) for name, ex in held_out.items()}


# ---------------------------------------------------------------------------------------
# ddfm.json

def _metadata(cfg: TrainConfig, world: int, counters: dict, part_sizes: dict, n_examples: int,
              skipped: list[FailedImage], memory: dict | None) -> dict:
    # paths as given (or absolute): save_checkpoint stores them relative to the run directory
    return {
        "stage": "train",
        "shard": cfg.data,
        "cluster": cluster_id(cfg),
        "init": cfg.init,
        "init_meta": read_meta(cfg.init),
        "examples": n_examples,
        # records of the shard not trained on because their image is missing or unreadable
        "skipped_images": {"count": len(skipped), "records": [f.to_json() for f in skipped]},
        "compute": {"steps": cfg.steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                    "world_size": world, "samples_seen": counters["samples"],
                    "tokens_seen": counters["tokens"], "loss_tokens_seen": counters["loss_tokens"],
                    "epochs": counters["samples"] / max(n_examples, 1), "match": cfg.matched,
                    # training-loop time of the steps that made this model, over resumes
                    # (work lost after the last checkpoint of an interrupted run not counted)
                    "elapsed_s": counters["elapsed_s"], "cpu_s": counters["cpu_s"],
                    "resumes": counters["resumes"], "steps_redone": counters["steps_redone"],
                    # bytes each rank held after its first step (local shards under --fsdp)
                    "memory_per_rank": memory},
        "trainable": {"parts": list(cfg.parts), "parameters": part_sizes},
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "versions": versions(),
    }
