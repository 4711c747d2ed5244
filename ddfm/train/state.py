"""What a run keeps besides its weights: the resume state, the counters and clock it carries,
and ``log.jsonl``.

A checkpoint every ``--save-every`` steps (model, optimizer, scheduler, RNG, step, counters
including elapsed and CPU time) lets ``--resume`` continue bit for bit where a killed job
stopped; ``log.jsonl`` is cut back to that step, so each step appears once and time runs
on. Under ``--fsdp`` model and optimizer are in ``resume/sharded-STEP/`` (one file per
rank, :mod:`ddfm.train.fsdp`) beside ``resume/state.pt``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ddfm.config import to_dict
from ddfm.io import atomic_path, atomic_write_text
from ddfm.runtime import Progress, is_main_process, rank
from ddfm.train import fsdp
from ddfm.train.config import TrainConfig
from ddfm.train.data import Example

log = logging.getLogger(__name__)

STATE_FILE = "resume/state.pt"
# running totals, carried in the resume state: samples and tokens seen, training time (wall
# and CPU) of the steps that made this model, resumes and steps done again
COUNTERS = {"samples": 0, "tokens": 0, "loss_tokens": 0, "elapsed_s": 0.0, "cpu_s": 0.0, "resumes": 0,
            "steps_redone": 0}
# options that do not change what is trained (sharded or not: load_state checks that itself)
NOT_IN_KEY = ("resume", "save_every", "log_every", "device", "compile", "out", "eval_data", "eval_every", "fsdp",
              "activation_checkpointing")


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse an ``out`` that holds a resume state unless ``--resume`` (ValueError naming the run)."""
    if (out / STATE_FILE).exists() and not resume:
        which = "a finished" if (out / "ddfm.json").is_file() else "an unfinished"
        raise ValueError(f"{out} holds {which} run ({STATE_FILE}); pass --resume or choose another --out")


def config_key(cfg: TrainConfig, examples: list[Example]) -> dict:
    """The options that define the run plus ``examples`` (:func:`examples_digest`): a resume
    state is only loaded into a run with the same key."""
    key = {k: v for k, v in to_dict(cfg).items() if k not in NOT_IN_KEY}
    key["examples"] = examples_digest(examples)
    return key


def examples_digest(examples: list[Example]) -> str:
    """Identity of what a run trains on: each example's id, token ids and image path, in order.

    The data order is ``randperm`` over these examples, so a resume state is only valid
    for the same list: a rewritten shard at the same path, another tokenizer, or images
    that now fail (or now load) change it.
    """
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


class Clock:
    """Wall and CPU seconds of training, starting from a resume's totals; the time spent
    inside :meth:`paused` (held-out evaluation) is not counted. CPU time is the steadier
    figure on a shared machine."""

    def __init__(self, elapsed: float = 0.0, cpu: float = 0.0):
        self.wall0, self.cpu0 = time.perf_counter() - elapsed, time.process_time() - cpu
        self.last = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def lap(self) -> float:
        """Wall seconds since the previous lap (or the start), paused time left out."""
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    @contextlib.contextmanager
    def paused(self):
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            self.wall0, self.cpu0, self.last = self.wall0 + wall, self.cpu0 + cpu, self.last + wall


class TrainLog:
    """One run's bookkeeping: the counters (:data:`COUNTERS`, in the resume state), the
    :class:`Clock`, the rows of ``log.jsonl`` and the progress bar or lines.

    Every rank counts and calls :meth:`save` (under ``--fsdp`` each writes its shards); only
    rank 0 writes ``log.jsonl``, ``state.pt`` and shows progress.
    """

    def __init__(self, cfg: TrainConfig, key: dict):
        self.cfg, self.key, self.out = cfg, key, Path(cfg.out)
        self.main = is_main_process()
        self.counters: dict[str, Any] = dict(COUNTERS)
        self.file = self.progress = self.clock = None

    def resume(self, model, optimizer, scheduler) -> int:
        """The step to start from: 0, or under ``--resume`` that of ``OUT/resume/state.pt``, whose
        model, optimizer, scheduler, RNG and counters are restored (log.jsonl cut back to it)."""
        if not (self.cfg.resume and (self.out / STATE_FILE).exists()):
            return 0
        step, saved = load_state(self.out, model, optimizer, scheduler, self.key, sharded=self.cfg.fsdp)
        self.counters = {**self.counters, **saved, "resumes": saved.get("resumes", 0) + 1}
        if self.main:
            self.counters["steps_redone"] += truncate_log(self.out / "log.jsonl", step)
        log.info("train: resuming %s at step %d (%.1f s of training so far)", self.out, step,
                 self.counters["elapsed_s"])
        return step

    def start(self, step: int, n_examples: int, world: int, micro: int) -> None:
        """Open ``log.jsonl`` (appended to after a resume), show progress and start the clock."""
        cfg = self.cfg
        if self.main:
            self.out.mkdir(parents=True, exist_ok=True)
            self.file = open(self.out / "log.jsonl", "a" if step else "w", encoding="utf-8")
            log.info("train: %s on %s (%d examples), %d steps x batch %d (%d ranks x %d accum x %d), parts %s",
                     cfg.init, cfg.data, n_examples, cfg.steps, cfg.batch_size, world, cfg.grad_accum, micro,
                     "+".join(cfg.parts))
        self.progress = Progress(cfg.steps, "train", unit="step", initial=step, every=cfg.log_every / cfg.steps)
        self.clock = Clock(self.counters["elapsed_s"], self.counters["cpu_s"])

    def untimed(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the clock paused (held-out evaluation is not training time)."""
        with self.clock.paused():
            return fn()

    def step_row(self, step: int, batch: list[Example], n_loss: int, loss: torch.Tensor, lr: float) -> dict:
        """Count a finished step and return its log row (loss: the all-reduced step loss)."""
        n_tokens = sum(len(e.input_ids) for e in batch)
        c = self.counters
        c.update(samples=c["samples"] + len(batch), tokens=c["tokens"] + n_tokens, loss_tokens=c["loss_tokens"] + n_loss)
        loss_value = loss.item()  # waits for the step to finish before the clock reads
        self._read_clock()
        return {"step": step, "loss": loss_value, "lr": lr, "tokens": n_tokens,
                "tokens_per_s": n_tokens / max(self.clock.lap(), 1e-9), "elapsed": c["elapsed_s"], "cpu_s": c["cpu_s"]}

    def write(self, row: dict) -> None:
        """Append ``row`` to log.jsonl (rank 0), flushed: a killed run keeps every row it wrote."""
        if not self.main:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if "loss" in row:
            self.progress.update(1, loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                 tok_s=f"{row['tokens_per_s']:.0f}", elapsed=f"{row['elapsed']:.1f}s")

    def save(self, model, optimizer, scheduler, step: int) -> None:
        """The resume state at ``step`` (:func:`save_state`; every rank calls)."""
        save_state(self.out, model, optimizer, scheduler, step, self.counters, self.key, sharded=self.cfg.fsdp,
                   rank=rank())

    def finish(self) -> None:
        """Close the progress and log.jsonl; the counters take the final time."""
        self.progress.close()
        if self.file is not None:
            self.file.close()
        self._read_clock()

    def _read_clock(self) -> None:
        self.counters["elapsed_s"], self.counters["cpu_s"] = self.clock.elapsed(), self.clock.cpu()
