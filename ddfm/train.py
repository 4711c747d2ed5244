"""Train the dense baseline or one expert on one shard (paper §4.1, §5.1–5.2).

    ddfm train --init runs/init --data data/mix/train.jsonl --out runs/dense --steps 400 --batch-size 32
    ddfm train --init runs/init --data runs/partition/shard-01.jsonl --out runs/expert-01 \\
        --match dense:400,32,4            # expert: the dense run's 400 steps at batch 32/4 = 8
    torchrun --nproc_per_node=2 -m ddfm train ...     # one expert data-parallel (DDP)
    torchrun --nproc_per_node=8 -m ddfm train --fsdp --activation-checkpointing --bf16 ...   # sharded (FSDP2)

Every expert is an ordinary, independent training job started from the same initial
checkpoint as the dense baseline. ``--train`` picks what learns: the ``llava`` recipe
(projector + language model, vision tower frozen), ``internvl`` (everything) or any
comma list of ``vision``, ``projector``, ``language``. Only assistant tokens are in the
loss (LLaVA convention); the loss of a step is the mean over the assistant tokens of the
whole global batch, whatever the split into ranks and micro-batches.

The data order is a pure function of ``(seed, step)``: epoch e visits the shard in the
order ``randperm(N, seed + e)`` and step s takes global samples ``[s·B, (s+1)·B)``. A
checkpoint every ``--save-every`` steps (model, optimizer, scheduler, RNG, step, counters
including elapsed and CPU time) lets ``--resume`` continue bit for bit where a killed job
stopped; ``log.jsonl`` is cut back to that step, so each step appears once and time runs on.

``--fsdp`` shards parameters, gradients and optimizer state over the ranks, one unit per
transformer block (:mod:`ddfm.fsdp`), for experts that do not fit one device; its resume
state is sharded too (``resume/sharded-STEP/``, one file per rank, beside ``state.pt``)
and the final checkpoint is gathered into one ordinary Hugging Face directory.

Records whose image is missing or unreadable are skipped with every record sharing the
image, named in one log line and listed in ``ddfm.json`` "skipped_images" (file, line, id,
image, reason); nothing else in the shard is dropped.

Output directory: the final Hugging Face checkpoint (``config.json``, ``model.safetensors``,
processor files) + ``ddfm.json`` (shard, cluster id, init checkpoint -- paths relative to
this directory, :func:`ddfm.model.checkpoint.read_meta` resolves them -- compute, seed, versions,
skipped records) + ``log.jsonl`` (one line per step) + ``resume/state.pt`` (latest
resume state; under ``--fsdp`` without model and optimizer, which are in ``resume/sharded-STEP/``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from ddfm import fsdp
from ddfm.config import arg, to_dict
from ddfm.data import FailedImage, load_records, log_failed_images, open_image
from ddfm.io import atomic_path, atomic_write_text
from ddfm.model.chat import encode_conversation, expand_image, get_tokenizer, image_token
from ddfm.model.checkpoint import load_model, read_meta, save_checkpoint
from ddfm.model.families import family_of, is_vision_language, part_of, stack_vision
from ddfm.runtime.provenance import versions

log = logging.getLogger(__name__)

# the trainable parts; which parameters each holds is written per family in
# ddfm/model/families.py (FAMILIES[model_type].parts)
PARTS = ("vision", "projector", "language")
# named recipes: LLaVA trains projector + LM with a frozen vision tower, InternVL everything,
# "align" is LLaVA's first stage (projector only).
RECIPES: dict[str, tuple[str, ...]] = {
    "llava": ("projector", "language"),
    "internvl": ("vision", "projector", "language"),
    "align": ("projector",),
}
IGNORE = -100  # label of tokens outside the loss
DEFAULT_STEPS, DEFAULT_BATCH_SIZE = 200, 16  # when neither given nor implied by --match
STATE_FILE = "resume/state.pt"


@dataclass
class TrainConfig:
    """``ddfm train``: one training job (dense baseline or one expert) on one shard."""

    init: str = arg("initial checkpoint directory (ddfm init, or any local HF VLM / causal LM)")
    data: str = arg("training shard (JSONL / LLaVA JSON)")
    out: str = arg("output directory (final HF checkpoint + ddfm.json + log.jsonl)")
    # None = not given: --match then supplies the value, else the default (resolved in __post_init__)
    steps: Optional[int] = arg(f"optimisation steps (default: {DEFAULT_STEPS}, or what --match implies)",
                               default=None)
    batch_size: Optional[int] = arg("global batch: samples per optimisation step, over all ranks "
                                    f"(default: {DEFAULT_BATCH_SIZE}, or what --match implies)", default=None)
    grad_accum: int = arg("micro-batches per step and rank (micro-batch = batch / (accum * ranks))", default=1)
    lr: float = arg("peak learning rate (AdamW)", default=1e-3)
    warmup: int = arg("linear warm-up steps before the cosine decay", default=10)
    min_lr_ratio: float = arg("final learning rate as a fraction of --lr", default=0.1)
    weight_decay: float = arg("AdamW weight decay", default=0.0)
    grad_clip: float = arg("clip the global gradient norm (0: off)", default=1.0)
    train: str = arg("what learns: recipe (llava, internvl, align) or comma list of vision,projector,language",
                     default="llava")
    match: str | None = arg("compute-match a dense run: dense:STEPS,BATCH,K -> STEPS steps at BATCH/K",
                            default=None)
    cluster: int | None = arg("cluster id of the shard (default: from a shard-XX file name)", default=None)
    save_every: int = arg("write the resume state every N steps (0: only at the end)", default=50)
    resume: bool = arg("continue from OUT/resume/state.pt if present", default=False)
    seed: int = arg("seed of the data order and RNG", default=0)
    bf16: bool = arg("bf16 compute: autocast, or under --fsdp bf16 parameters in forward/backward with "
                     "fp32 gradient reduction (MixedPrecisionPolicy)", default=False)
    fsdp: bool = arg("shard parameters, gradients and optimizer state over the ranks (PyTorch FSDP2, one unit "
                     "per transformer block); for experts that do not fit one device", default=False)
    activation_checkpointing: bool = arg("recompute each transformer block's activations in backward instead "
                                         "of keeping them (less memory, about one more forward of compute)",
                                         default=False)
    compile: bool = arg("torch.compile the model", default=False)
    device: str = arg("cpu, cuda or auto", default="auto")
    log_every: int = arg("log a plain line every N steps when not on a terminal", default=10)
    eval_data: list[str] = arg("held-out data files whose answer loss is logged (log.jsonl eval_loss) before "
                               "training, every --eval-every steps and at the end", default_factory=list)
    eval_every: int = arg("steps between held-out losses (0: only before and after training)", default=0)
    parts: tuple[str, ...] = field(default=(), init=False)
    matched: dict | None = field(default=None, init=False)

    def __post_init__(self):
        self.parts = parse_parts(self.train)
        implied = {"steps": DEFAULT_STEPS, "batch_size": DEFAULT_BATCH_SIZE}
        if self.match:
            self.matched = parse_match(self.match)
            implied = {name: self.matched[name] for name in implied}
            for name, value in implied.items():
                given, flag = getattr(self, name), "--" + name.replace("_", "-")
                if given is not None and given != value:
                    raise ValueError(f"{flag} {given} conflicts with --match {self.match}, which implies "
                                     f"{flag} {value}; give only one of them")
        for name, value in implied.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.save_every < 0 or self.eval_every < 0:
            raise ValueError("--warmup, --save-every and --eval-every must be >= 0")
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"--device must be cpu, cuda or auto, got {self.device!r}")


def parse_parts(spec: str) -> tuple[str, ...]:
    """``"llava"`` -> ``("projector", "language")``; ``"vision,language"`` -> as given."""
    if spec in RECIPES:
        return RECIPES[spec]
    parts = tuple(p.strip() for p in spec.split(",") if p.strip())
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ValueError(f"--train: unknown part(s) {unknown or [spec]}; use a recipe "
                         f"({', '.join(RECIPES)}) or a comma list of {', '.join(PARTS)}")
    return parts


def parse_match(spec: str) -> dict:
    """``"dense:STEPS,BATCH,K"`` -> the expert's compute: STEPS steps at batch BATCH/K."""
    m = re.fullmatch(r"dense:(\d+),(\d+),(\d+)", spec.strip())
    if not m:
        raise ValueError(f"--match: expected dense:STEPS,BATCH,K (e.g. dense:400,32,4), got {spec!r}")
    steps, batch, k = map(int, m.groups())
    if k < 1 or batch % k:
        raise ValueError(f"--match: the dense batch {batch} must be divisible by K={k}")
    return {"dense_steps": steps, "dense_batch_size": batch, "k": k, "steps": steps, "batch_size": batch // k}


# ---------------------------------------------------------------------------------------
# data

@dataclass
class Example:
    """One encoded record: ``input_ids`` (T,), ``labels`` (T,) with IGNORE outside answers."""

    id: str
    input_ids: list[int]
    labels: list[int]
    image: str | None
    n_loss: int  # tokens in the loss: labels[1:] that are not IGNORE (the first is never predicted)
    token_types: dict = field(default_factory=dict)  # per-token inputs (Qwen2-VL's mm_token_type_ids), each (T,)


def encode_shard(path: str, processor, model) -> tuple[list[Example], dict[str, Any], list[FailedImage]]:
    """Load, encode and check a shard against the init checkpoint; raise before training.

    Returns the examples, a dict of each image's processor inputs keyed by path
    (``pixel_values`` and whatever else the family returns, the image on dim 0; every
    record's placeholder expanded to its own image's tokens) and the records left out
    because their image is missing or unreadable (every record sharing such an image;
    :class:`ddfm.data.FailedImage`, listed in ``ddfm.json``). Errors (ValueError, naming
    the file and records): empty shard, images for a text-only checkpoint, a tokenizer
    that does not fit the model,
    special-token text inside the data, a sequence longer than the model's context.
    """
    loaded = load_records(path)
    records, skipped = loaded.records, list(loaded.missing_images)
    if not records:
        raise ValueError(f"{path}: the shard is empty (no usable records"
                         + (f"; {len(skipped)} left out because their image is missing)" if skipped else ")"))
    tokenizer = get_tokenizer(processor)
    placeholder = image_token(processor)
    with_images = [r for r in records if r.has_image]
    if with_images and placeholder is None:
        raise ValueError(f"{path}: {len(with_images)} record(s) have images (first: {with_images[0].id}) "
                         "but the init checkpoint is text-only (no image token / processor)")
    _check_special_text(path, records, tokenizer)
    config = model.config
    vocab = config.get_text_config().vocab_size
    context = getattr(config.get_text_config(), "max_position_embeddings", None)
    examples, too_long, expanded, unreadable = [], [], {}, {}
    for r in records:
        key = str(r.image_path) if r.has_image else None
        if key is not None and key not in expanded and key not in unreadable:
            try:
                image = open_image(r.image_path)
            except ValueError as err:  # unreadable bytes: this record and all that share the image
                unreadable[key] = str(err)
            else:  # each image through the family's processor once, its ids spliced into every record
                expanded[key] = expand_image(processor, image)
        if key in unreadable:
            skipped.append(FailedImage.of(r, unreadable[key]))
            continue
        enc = encode_conversation(processor, r.conversations, [expanded[key]] if key else None)
        ids, mask = enc.ids, enc.mask
        if max(ids) >= vocab:
            raise ValueError(f"{path}: record {r.id}: token id {max(ids)} >= the model's vocabulary "
                             f"{vocab}: the checkpoint's tokenizer does not match its model")
        if context and len(ids) > context:
            too_long.append(f"{r.id} ({len(ids)} tokens)")
        labels = [t if m else IGNORE for t, m in zip(ids, mask)]
        examples.append(Example(r.id, ids, labels, key, sum(x != IGNORE for x in labels[1:]),
                                {k: v.tolist() for k, v in enc.token_types.items()}))
    if too_long:
        raise ValueError(f"{path}: {len(too_long)} record(s) longer than the model's context of {context} "
                         f"tokens: {', '.join(too_long[:5])}")
    if not examples:
        raise ValueError(f"{path}: no usable records: all {len(skipped)} left out because their image failed "
                         f"(first: {skipped[0]})")
    skipped.sort(key=lambda f: f.line)
    return examples, {k: e.vision for k, e in expanded.items()}, skipped


def _check_special_text(path, records, tokenizer) -> None:
    # text that spells a special token would be read as that token: the data were made
    # for another tokenizer (or need escaping) -- refuse instead of training on it.
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) if t]
    specials += [t for t in getattr(tokenizer, "additional_special_tokens", []) or [] if t]
    for r in records:
        for turn in r.conversations:
            hit = next((s for s in specials if s in turn["value"]), None)
            if hit:
                raise ValueError(f"{path}: record {r.id}: its text contains {hit!r}, a special token of the "
                                 "init checkpoint's tokenizer; the shard does not match this tokenizer")


def sample_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Indices of global samples ``[start, start + count)``: epoch e is ``randperm(n, seed + e)``."""
    import torch

    out, pos = [], start
    while len(out) < count:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        take = perm[offset: offset + count - len(out)]
        out += take
        pos += len(take)
    return out


def collate(examples: list[Example], pixels: dict, pad_id: int) -> dict:
    """Right-padded batch: ``input_ids``/``labels``/``attention_mask`` (B, T) int64, the
    per-token inputs (B, T) padded with 0, and the image inputs of the examples with an
    image, in order (``ddfm.model.families.stack_vision``: e.g. ``pixel_values`` (n, 3, H, W))."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    attn = torch.zeros((len(examples), T), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attn}
    for key in {k for e in examples for k in e.token_types}:
        batch[key] = torch.zeros((len(examples), T), dtype=torch.long)
        for i, e in enumerate(examples):
            if key in e.token_types:  # else all text: type 0
                batch[key][i, :len(e.input_ids)] = torch.tensor(e.token_types[key])
    images = [pixels[e.image] for e in examples if e.image is not None]
    if images:
        batch.update(stack_vision(images))
    return batch


def length_groups(examples: list[Example], max_padding: float = 0.25) -> list[list[Example]]:
    """Split a micro-batch into groups of similar length (padding <= ``max_padding`` of tokens).

    A mixed batch (image records of ~40 tokens, text passages of ~400) padded as one would
    spend most of its compute on padding. The loss is a sum over samples normalised by the
    global token count, so running the groups one after another gives the same gradient.
    """
    groups: list[list[Example]] = []
    for e in sorted(examples, key=lambda e: -len(e.input_ids)):
        g = groups[-1] if groups else None
        if g is not None:
            longest, total = len(g[0].input_ids), sum(len(x.input_ids) for x in g) + len(e.input_ids)
            if longest * (len(g) + 1) <= (1 + max_padding) * total:
                g.append(e)
                continue
        groups.append([e])
    return groups


def rank_groups(batch: list[Example], rank: int, world: int, micro: int, accum: int, sharded: bool,
                ballast: Example | None) -> list[list[Example]]:
    """This rank's share of the global batch, as the groups it runs forward one after another.

    Micro-batch a of rank r is samples ``[(a·world + r)·micro, +micro)``, split by length
    (:func:`length_groups`). Under FSDP (``sharded``) every rank must run the same blocks
    the same number of times, since each block's all-gather is a collective: micro-batches
    stay whole, and one without an image gets ``ballast`` (:func:`ballast_example`) so the
    vision tower and projector run on every rank (LLaVA's training code gives text-only
    samples a blank image).
    """
    groups = []
    for a in range(accum):
        examples = batch[(a * world + rank) * micro:][:micro]
        if not sharded:
            groups += length_groups(examples)
        elif ballast is not None and all(e.image is None for e in examples):
            groups.append(examples + [ballast])
        else:
            groups.append(examples)
    return groups


def ballast_example(examples: list[Example]) -> Example | None:
    """The shortest example with an image, every label IGNORE: it runs the vision tower and
    projector but adds nothing to the loss or the gradients. None for a shard without images."""
    with_image = [e for e in examples if e.image is not None]
    if not with_image:
        return None
    e = min(with_image, key=lambda e: len(e.input_ids))
    return replace(e, id=f"{e.id} (ballast)", labels=[IGNORE] * len(e.labels), n_loss=0)


# ---------------------------------------------------------------------------------------
# model, optimizer, schedule, distributed

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


def lr_lambda(warmup: int, steps: int, min_ratio: float):
    """Multiplier of the peak lr at step s: linear warm-up, then cosine decay to ``min_ratio``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def setup_distributed(device: str, fsdp: bool = False):
    """(rank, world_size, device) — DDP or FSDP under torchrun (gloo on CPU, nccl on GPU).

    FSDP needs a process group even in one process: a one-rank group on an in-memory store.
    """
    import torch
    import torch.distributed as dist

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if device == "cuda" else "gloo"
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif fsdp and not dist.is_initialized():
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank = dist.get_rank() if world > 1 else 0
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return rank, world, device


def examples_digest(examples: list[Example]) -> str:
    """Identity of what a run trains on: each example's id, token ids and image path, in order.

    The data order is ``randperm`` over these examples, so a resume state is only valid
    for the same list: a rewritten shard at the same path, another tokenizer, or images
    that now fail (or now load) change it.
    """
    import hashlib

    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.id, e.image, e.input_ids, e.labels], separators=(",", ":")).encode())
    return h.hexdigest()


def save_state(out: Path, model, optimizer, scheduler, step: int, counters: dict, config_key: dict,
               *, sharded: bool = False, rank: int = 0) -> None:
    """The resume state: one dict of tensors and plain values, written atomically by rank 0.

    ``config_key``: the options that define the run, plus ``examples`` (:func:`examples_digest`).
    ``sharded`` (``--fsdp``; every rank calls): model and optimizer go to
    ``resume/sharded-STEP/``, each rank writing its own shards; ``state.pt``, written
    after them, names that directory, so a kill in between leaves the previous state whole.
    """
    import torch

    state = {"scheduler": scheduler.state_dict(), "step": step, "counters": counters,
             "rng_cpu": torch.get_rng_state(),
             "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
             "config": json.dumps({k: v for k, v in config_key.items() if k != "examples"}, sort_keys=True),
             "examples": config_key["examples"]}
    if sharded:
        state["sharded"] = fsdp.save_sharded(out / "resume", step, model, optimizer, rank)
    elif rank == 0:
        state.update(model=model.state_dict(), optimizer=optimizer.state_dict())
    if rank != 0:
        return
    with atomic_path(out / STATE_FILE) as tmp:
        torch.save(state, tmp)
    if sharded:
        fsdp.drop_stale_sharded(out / "resume", keep=state["sharded"])


def load_state(out: Path, model, optimizer, scheduler, config_key: dict, *, sharded: bool = False
               ) -> tuple[int, dict]:
    """Restore a resume state (``weights_only=True``); refuse one from another configuration."""
    import torch

    state = torch.load(out / STATE_FILE, map_location="cpu", weights_only=True)
    if ("sharded" in state) != sharded:
        raise ValueError(f"{out / STATE_FILE}: written by a run {'with' if 'sharded' in state else 'without'} "
                         f"--fsdp; resume it {'with' if 'sharded' in state else 'without'} --fsdp")
    if state["config"] != json.dumps({k: v for k, v in config_key.items() if k != "examples"}, sort_keys=True):
        raise ValueError(f"{out / STATE_FILE}: written by a run with a different configuration "
                         f"({state['config']}); use another --out or the same options")
    if state.get("examples", config_key["examples"]) != config_key["examples"]:  # states before this check pass
        raise ValueError(f"{out / STATE_FILE}: the training examples of {config_key['data']} changed since this "
                         "state was written (the shard was rewritten, the tokenizer differs, or images now "
                         "fail or load); resuming would continue on another data order: use another --out")
    if sharded:
        fsdp.load_sharded(out / "resume" / state["sharded"], model, optimizer)
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng_cpu"])
    if state["rng_cuda"]:
        torch.cuda.set_rng_state_all(state["rng_cuda"])
    return state["step"], state["counters"]


def truncate_log(path: Path, step: int) -> int:
    """Cut ``log.jsonl`` back to the resumed ``step``, atomically; return the steps cut.

    The rows an interrupted run logged after its last checkpoint describe work that the
    resumed run does again: they go, so every step appears once. If a step appears more
    than once (a log from before this rule), its last row is the one kept. A row cut off
    mid-write by a kill is dropped.
    """
    if not path.is_file():
        return 0
    rows: dict[int, str] = {}
    beyond: set[int] = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            s = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
        if s <= step:
            rows[s] = line
        else:
            beyond.add(s)
    if len(rows) < step:
        log.warning("train: %s holds rows for %d of the %d steps before the resume point", path, len(rows), step)
    atomic_write_text(path, "".join(rows[s] + "\n" for s in sorted(rows)))
    return len(beyond)


def _cluster_id(cfg: TrainConfig) -> int | None:
    if cfg.cluster is not None:
        return cfg.cluster
    m = re.fullmatch(r"shard-(\d+)\.jsonl?", Path(cfg.data).name)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------
# the training loop

def train(cfg: TrainConfig) -> Path:
    """Train ``cfg.init`` on ``cfg.data``; write the checkpoint, ddfm.json and log.jsonl to ``cfg.out``.

    Loss (per step, global batch G split over ranks r and micro-batches a):
    L = Σ_{r,a} Σ_{answer tokens} −log p(x_t | x_<t, image) / N_G, N_G = answer tokens in G,
    so DDP's (or FSDP's) gradient mean times the world size is exactly ∇L of the single-process run.
    """
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    # ---- setup
    rank, world, device = setup_distributed(cfg.device, cfg.fsdp)
    out = Path(cfg.out)
    micro = cfg.batch_size // (cfg.grad_accum * world)
    if micro * cfg.grad_accum * world != cfg.batch_size:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by --grad-accum {cfg.grad_accum} "
                         f"x {world} rank(s)")
    if (out / STATE_FILE).exists() and not cfg.resume:
        which = "a finished" if (out / "ddfm.json").is_file() else "an unfinished"
        raise ValueError(f"{out} holds {which} run ({STATE_FILE}); pass --resume or choose another --out")
    torch.manual_seed(cfg.seed)
    # fp32 master weights whatever the checkpoint's dtype (transformers 5 loads a bf16/fp16
    # checkpoint as such, and AdamW on half-precision weights loses small updates);
    # --bf16 computes in bf16 under autocast
    model, processor = load_model(cfg.init, dtype=torch.float32)
    examples, pixels, skipped = encode_shard(cfg.data, processor, model)
    if rank == 0:
        log_failed_images(f"train {cfg.data}", skipped, f"{out}/ddfm.json")
    held_out = {}  # name -> examples of each --eval-data file
    for path in cfg.eval_data:
        ex, px, failed = encode_shard(path, processor, model)
        if rank == 0:
            log_failed_images(f"train --eval-data {path}", failed, f"{out}/log.jsonl")
        held_out[Path(path).stem] = ex
        pixels.update(px)
    vlm = is_vision_language(model.config)
    part_sizes = set_trainable(model, cfg.parts)
    if cfg.activation_checkpointing:
        fsdp.enable_activation_checkpointing(model)
    if cfg.fsdp:
        fsdp.shard_model(model, device, world, cfg.bf16)  # before the optimizer: it holds the shards
    else:
        model.to(device)
    model.train()
    pad_id = get_tokenizer(processor).pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    # under FSDP: the shards (taken before any forward: an FSDP root keeps the gathered ones after it)
    params = [p for p in model.parameters() if p.requires_grad]
    _dry_run(model, collate(examples[:1], pixels, pad_id), device, cfg.data)
    # foreach: one dispatch per list of FSDP's DTensor shards instead of one per tensor (3x faster on CPU)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay,
                                  foreach=cfg.fsdp or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.warmup, cfg.steps, cfg.min_lr_ratio))
    config_key = {k: v for k, v in to_dict(cfg).items()
                  if k not in ("resume", "save_every", "log_every", "device", "compile", "out", "eval_data",
                               "eval_every", "fsdp", "activation_checkpointing")}  # sharded or not: see load_state
    config_key["examples"] = examples_digest(examples)
    # running totals, carried in the resume state: samples and tokens seen, training time
    # (wall and CPU) of the steps that made this model, resumes and steps done again
    step, counters = 0, {"samples": 0, "tokens": 0, "loss_tokens": 0, "elapsed_s": 0.0, "cpu_s": 0.0,
                         "resumes": 0, "steps_redone": 0}
    if cfg.resume and (out / STATE_FILE).exists():
        step, saved = load_state(out, model, optimizer, scheduler, config_key, sharded=cfg.fsdp)
        counters = {**counters, **saved, "resumes": saved.get("resumes", 0) + 1}
        if rank == 0:
            counters["steps_redone"] += truncate_log(out / "log.jsonl", step)
        log.info("train: resuming %s at step %d (%.1f s of training so far)", out, step, counters["elapsed_s"])
    ddp = DDP(model, find_unused_parameters=vlm) if world > 1 and not cfg.fsdp else model
    ballast = ballast_example(examples) if cfg.fsdp else None
    memory = None  # bytes of parameters, gradients and optimizer state per rank, after the first step
    fwd = torch.compile(ddp) if cfg.compile else ddp
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "log.jsonl", "a" if step else "w", encoding="utf-8")
        log.info("train: %s on %s (%d examples), %d steps x batch %d (%d ranks x %d accum x %d), parts %s",
                 cfg.init, cfg.data, len(examples), cfg.steps, cfg.batch_size, world, cfg.grad_accum,
                 micro, "+".join(cfg.parts))
    bar = _progress(cfg, step, rank)
    # under FSDP, bf16 is its mixed-precision policy (ddfm.fsdp.shard_model), not autocast
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=cfg.bf16 and not cfg.fsdp)
    t_start, t_last, cpu_start = time.perf_counter(), time.perf_counter(), time.process_time()
    elapsed0, cpu0 = counters["elapsed_s"], counters["cpu_s"]  # time before a resume

    def clock() -> None:  # elapsed and CPU time up to now, resumes included
        counters["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
        counters["cpu_s"] = cpu0 + time.process_time() - cpu_start  # CPU time: steadier on a shared machine

    def evaluate_held_out() -> dict:  # {file stem: mean answer NLL}; not counted as training time
        nonlocal t_start, cpu_start
        t0, c0 = time.perf_counter(), time.process_time()
        losses = {name: held_out_loss(model, ex, pixels, pad_id, device, autocast) for name, ex in held_out.items()}
        t_start, cpu_start = t_start + time.perf_counter() - t0, cpu_start + time.process_time() - c0
        return losses

    if held_out and step == 0:
        losses = evaluate_held_out()
        if rank == 0:
            log_file.write(json.dumps({"step": 0, "eval_loss": losses}) + "\n")
            log_file.flush()

    # ---- train
    while step < cfg.steps:
        order = sample_order(len(examples), cfg.seed, step * cfg.batch_size, cfg.batch_size)
        batch_examples = [examples[i] for i in order]
        n_loss = sum(e.n_loss for e in batch_examples)  # N_G: answer tokens of the global batch
        step_loss = torch.zeros((), device=device)
        mine = rank_groups(batch_examples, rank, world, micro, cfg.grad_accum, cfg.fsdp, ballast)
        for i, group in enumerate(mine):
            batch = {k: v.to(device) for k, v in collate(group, pixels, pad_id).items()}
            labels = batch.pop("labels")
            # DDP all-reduces gradients once per step; FSDP reduce-scatters after every
            # micro-batch, so that no rank ever holds the whole model's gradients
            sync = i == len(mine) - 1 or world == 1 or cfg.fsdp
            with (ddp.no_sync() if not sync else nullcontext()), autocast:
                loss = answer_nll(fwd(**batch, use_cache=False).logits, labels)[0] / max(n_loss, 1)  # logits (B, T, V)
                if not loss.requires_grad and not cfg.fsdp:
                    # nothing trainable on this path (a text-only group under the projector-only
                    # "align" recipe): a zero-weighted tie to the parameters gives zero
                    # gradients, so every rank still joins DDP's all-reduce. (Under FSDP no
                    # rank reaches a trainable parameter then, see rank_groups: all skip.)
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
        n_tokens = sum(len(e.input_ids) for e in batch_examples)
        counters.update(samples=counters["samples"] + len(batch_examples), tokens=counters["tokens"] + n_tokens,
                        loss_tokens=counters["loss_tokens"] + n_loss)
        if rank == 0:
            loss_value = step_loss.item()  # waits for the step to finish before the clock reads
            now = time.perf_counter()
            clock()
            row = {"step": step, "loss": loss_value, "lr": lr, "tokens": n_tokens,
                   "tokens_per_s": n_tokens / max(now - t_last, 1e-9), "elapsed": counters["elapsed_s"],
                   "cpu_s": counters["cpu_s"]}
        if held_out and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            losses = evaluate_held_out()
            if rank == 0:
                row["eval_loss"] = losses
        if rank == 0:
            t_last = time.perf_counter()
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            _report(bar, row, cfg)
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
            save_state(out, model, optimizer, scheduler, step, counters, config_key, sharded=cfg.fsdp, rank=rank)

    # ---- cleanup
    if rank == 0:
        if bar is not None:
            bar.close()
        log_file.close()
        clock()
    save_state(out, model, optimizer, scheduler, step, counters, config_key, sharded=cfg.fsdp, rank=rank)
    weights = fsdp.full_state_dict(model) if cfg.fsdp else None  # the whole model, on rank 0's CPU
    if rank == 0:
        meta = _metadata(cfg, world, counters, part_sizes, len(examples), skipped, memory)
        save_checkpoint(model, processor, out, meta=meta, processor_files=cfg.init, state_dict=weights)
        log.info("train: done, %d samples, %d tokens -> %s", counters["samples"], counters["tokens"], out)
    if world > 1 or cfg.fsdp:
        dist.barrier()
        dist.destroy_process_group()
    return out


def answer_nll(logits, labels):
    """Σ −log p(x_t | x_<t) over the answer tokens: logits (B, T, V), labels (B, T) with
    IGNORE outside answers. Returns (summed NLL (float32 scalar tensor), answer tokens)."""
    import torch

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
    import torch

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


def _dry_run(model, batch, device, path) -> None:
    # one forward before training: a processor/model mismatch (image-token count, ids)
    # fails here with a clear message instead of after the first optimiser step
    import torch

    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    try:
        with torch.no_grad():
            model(**batch, use_cache=False)
    except (ValueError, RuntimeError, IndexError) as err:
        raise ValueError(f"{path}: the first example does not fit the init checkpoint: {err}") from None


def _progress(cfg: TrainConfig, step: int, rank: int):
    if rank != 0 or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=step, desc="train", unit="step", dynamic_ncols=True)


def _report(bar, row: dict, cfg: TrainConfig) -> None:
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    elif row["step"] % cfg.log_every == 0 or row["step"] == cfg.steps:
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  %.1fs", row["step"], cfg.steps, row["loss"],
                 row["lr"], row["tokens_per_s"], row["elapsed"])


def _metadata(cfg: TrainConfig, world: int, counters: dict, part_sizes: dict, n_examples: int,
              skipped: list[FailedImage], memory: dict | None) -> dict:
    # paths as given (or absolute): save_checkpoint stores them relative to the run directory
    return {
        "stage": "train",
        "shard": cfg.data,
        "cluster": _cluster_id(cfg),
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
