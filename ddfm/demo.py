"""The demo: the whole method on the embedded real data, with REPORT.md (paper §4–5).

    ddfm demo                          # image mixture, tiny-llava experts (what `make demo` runs)
    ddfm demo --preset text            # python-docs, minilm encoder, tiny-lm experts, perplexity
    ddfm demo --quick --out /tmp/d     # the same pipeline at toy sizes (< 1 min, for the tests)

Stages, each writing its own subdirectory of the run directory (``--out``, default
``runs/demo``) and a ``DONE.json`` marker when it has finished:

    data        ddfm prepare mix                      real Fashion-MNIST + digits + python-docs
    init        ddfm init --preset tiny-llava         tokenizer + randomly initialised base
    align       ddfm train --train align              short centralised alignment (projector only):
                                                      the experts start from this checkpoint, as the
                                                      paper's start from the aligned LLaVA checkpoint
    embed       ddfm embed --encoder efficientnet-lite0
    partition   ddfm partition --k 2                  balanced spherical k-means, router file
    dense       ddfm train (all data)                 the dense baseline
    expert-k    ddfm train --match dense:S,B,K        expert k on shard k: same steps, batch B/K
    eval-*      ddfm eval                             dense; ensemble top-1 / soft centroid routing
                                                      (eq. 29) and posterior routing (eq. 26–27)
    REPORT.md   tables (dense vs experts per task, chance level, compute) + PNG plots

An interrupted demo resumes where it stopped: a stage whose marker holds the same key
(its configuration and the keys of the stages it reads) is not redone; an interrupted
training stage continues from its resume state (``ddfm train --resume``). The same seed
gives the same numbers. Presets are data (:data:`PRESETS`, :data:`QUICK`).

Python API: ``demo(DemoConfig(out="runs/demo"))`` returns the REPORT.md path.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from ddfm.config import arg
from ddfm.pipeline import (
    Pipeline,
    stage_base,
    stage_data,
    stage_dense,
    stage_eval,
    stage_experts,
    stage_partition,
    stage_val_shards,
)
from ddfm.report import write_report
from ddfm.routing import ROUTINGS
from ddfm.runtime.device import DEVICE_HELP, check_device

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "demo", "PRESETS", "QUICK", "resolve_preset", "run_core"]

# name -> preset (data). Sizes are budgeted for 20 minutes on 2 CPU cores. A training
# stage gives "epochs" (passes over its data; steps = ceil(epochs * records / batch)) or
# "steps"; the experts get the dense run's steps at batch/K (--match).
PRESETS: dict[str, dict[str, Any]] = {
    "image": {
        "help": "the paper's regime: pretrained + aligned base, one pass over 8,000 unique images; "
                "Fashion-MNIST + digits, tiny-llava experts, accuracy",
        "prepare": {"source": "mix", "train_size": 8000, "test_size": 300, "val_size": 200, "align_size": 8000,
                    "pretrain_size": 3000, "text_share": 0.05, "max_words": 24},
        "model": "tiny-llava",
        "encoder": "efficientnet-lite0",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        # the base every run starts from, as LLaVA's: a language model pretrained on text,
        # then aligned to the vision tower on image-caption pairs (the tiny tower starts
        # random, where the paper's CLIP is pretrained, so alignment trains it too)
        "pretrain": {"data": "pretrain", "train": "language", "epochs": 1, "batch_size": 16, "lr": 2e-3,
                     "warmup": 10},
        "align": {"data": "align", "train": "internvl", "epochs": 1, "batch_size": 32, "lr": 2e-3, "warmup": 10},
        # visual instruction tuning: one pass, the LLaVA recipe (tower frozen, projector + LM)
        "dense": {"train": "llava", "epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup": 20},
        "eval_points": 8,  # held-out loss this many times during dense and expert training
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 32, "max_new_tokens": 8, "limit": None},
        "metric": "accuracy",
        # ddfm ablate's studies: training-image fractions (one pass each), alignment-step
        # fractions (on base_data of the images), other seeds of the whole demo
        "studies": {"data": [0.25, 0.5, 1], "base": [0, 0.25, 1], "base_data": 0.25, "seeds": [1, 2]},
    },
    # a smaller regime: a 200-step aligned base, 2,000 images seen about four times
    "image-small": {
        "help": "2,000 images repeated ~4 times from a briefly aligned base (a toy regime, ~4x faster)",
        "prepare": {"source": "mix", "train_size": 2000, "test_size": 300, "val_size": 200, "text_share": 0.05,
                    "max_words": 24},
        "model": "tiny-llava",
        "encoder": "efficientnet-lite0",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        "pretrain": None,
        "align": {"data": "train-images", "train": "internvl", "steps": 200, "batch_size": 32, "lr": 2e-3,
                  "warmup": 10},
        "dense": {"train": "internvl", "steps": 1000, "batch_size": 32, "lr": 1e-3, "warmup": 20},
        "eval_points": 8,
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 32, "max_new_tokens": 8, "limit": None},
        "metric": "accuracy",
        "studies": {"data": [0.25, 0.5, 1], "base": [0, 0.25, 1], "base_data": 0.25, "seeds": [1, 2]},
    },
    # both halves pretrained (ddfm/model/dinov2.py, SmolLM2 GGUF): only the projector is new.
    # The base is LLaVA's stage 1 (the projector alone, on image-caption pairs); instruction
    # tuning trains the projector and the language model through LoRA adapters (merged at
    # the end). The sizes are an estimate for 2 CPU cores, not yet timed at full size.
    "pretrained": {
        "help": "both halves pretrained: DINOv2-small tower + SmolLM2-135M (preset smollm2-dinov2), "
                "projector aligned by ddfm, LoRA experts; Fashion-MNIST + digits, accuracy",
        "prepare": {"source": "mix", "train_size": 500, "test_size": 75, "val_size": 40, "align_size": 1000,
                    "text_share": 0.05, "max_words": 24},
        "model": "smollm2-dinov2",
        "encoder": "efficientnet-lite0",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        "pretrain": None,
        "align": {"data": "align", "train": "align", "epochs": 1, "batch_size": 16, "lr": 1e-3, "warmup": 10},
        "dense": {"train": "llava", "lora": 16, "lora_alpha": 32.0, "epochs": 1, "batch_size": 16, "lr": 5e-4,
                  "warmup": 10},
        "eval_points": 4,
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 16, "max_new_tokens": 8, "limit": None},
        "metric": "accuracy",
        "studies": {"data": [0.5, 1], "base": [0, 1], "base_data": 0.5, "seeds": [1, 2]},
    },
    "text": {
        "help": "python-docs passages, minilm encoder, tiny-lm experts, perplexity",
        "prepare": {"source": "python-docs", "train_size": 1500, "test_size": 150, "max_words": 60},
        "model": "tiny-lm",
        "encoder": "minilm",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        "pretrain": None,
        # no vision: the centralised warm-up trains the whole language model briefly
        "align": {"data": "train", "train": "language", "steps": 60, "batch_size": 16, "lr": 2e-3, "warmup": 5},
        "skip_ablations": ["encoder"],  # no pixels or vision tower to ablate on text
        "dense": {"train": "language", "steps": 300, "batch_size": 16, "lr": 1e-3, "warmup": 20},
        "eval_points": 0,
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 16, "max_new_tokens": 8, "limit": None},
        "metric": "perplexity",
    },
}

# --quick: overrides merged into the preset (toy sizes, same stages).
_QUICK_IMAGE = {"prepare": {"train_size": 24, "test_size": 6, "val_size": 4, "align_size": 16, "text_share": 0.05,
                            "max_words": 30},
                "encoder": "pixels", "fine_clusters": 8,
                "align": {"epochs": 1, "batch_size": 8}, "dense": {"epochs": 0.4, "batch_size": 8},
                "eval": {"batch_size": 16, "max_new_tokens": 3, "limit": 16}, "eval_points": 2,
                "studies": {"data": [0.5, 1], "base": [0, 1], "base_data": 0.5, "seeds": [1]}}
QUICK: dict[str, dict[str, Any]] = {
    "image": {**_QUICK_IMAGE, "prepare": {**_QUICK_IMAGE["prepare"], "pretrain_size": 12},
              "pretrain": {"epochs": 1, "batch_size": 4}},
    "image-small": {**_QUICK_IMAGE, "align": {"steps": 2, "batch_size": 8}, "dense": {"steps": 4, "batch_size": 8}},
    "pretrained": {**_QUICK_IMAGE, "prepare": {**_QUICK_IMAGE["prepare"], "train_size": 8, "align_size": 8},
                   "align": {"steps": 2, "batch_size": 4}, "dense": {"steps": 2, "batch_size": 4},
                   "eval": {"batch_size": 8, "max_new_tokens": 2, "limit": 8}},
    "text": {"prepare": {"train_size": 40, "test_size": 6, "max_words": 30}, "fine_clusters": 8,
             "align": {"steps": 2, "batch_size": 4}, "dense": {"steps": 4, "batch_size": 4},
             "eval": {"batch_size": 8, "max_new_tokens": 3, "limit": 6}},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(name: str, quick: bool = False) -> dict[str, Any]:
    """The preset ``name``, with the :data:`QUICK` overrides when ``quick``."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return _merge(PRESETS[name], QUICK[name]) if quick else copy.deepcopy(PRESETS[name])



# ------------------------------------------------------------------------------ the demo

@dataclass
class DemoConfig:
    """``ddfm demo [--preset image|text] [--quick] [--out DIR] [--seed N]``."""

    out: str = arg("run directory (one subdirectory per stage, REPORT.md)", default="runs/demo")
    preset: str = arg("demo preset: " + "; ".join(f"{k} ({v['help']})" for k, v in PRESETS.items()),
                      default="image", choices=tuple(PRESETS))
    quick: bool = arg("toy sizes: the same pipeline in under a minute (for the tests)", default=False)
    seed: int = arg("seed of every stage (data, init, training order, k-means)", default=0)
    threads: Optional[int] = arg("torch threads (default: torch's choice)", default=None)
    device: str = arg(DEVICE_HELP + "; every stage runs on it", default="auto")

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")
        check_device(self.device)


def run_core(p: Pipeline, preset: dict) -> dict[str, Any]:
    """The demo's stages up to the evaluations; returns the names the report needs."""
    stage_data(p, preset)
    stage_base(p, preset)
    part = stage_partition(p, preset, encoder=preset["encoder"], k=preset["k"], algorithm=preset["algorithm"])
    val = stage_val_shards(p, preset, part)
    stage_dense(p, preset, val)
    experts = stage_experts(p, preset, part, preset["k"], val=val)
    evals = {"dense": stage_eval(p, preset, "eval-dense", ["dense"], part, None)}
    for r in preset["routings"]:
        evals[r] = stage_eval(p, preset, f"eval-{r}", experts, part, ROUTINGS[r])
    return {"partition": part, "experts": experts, "evals": evals, "val": val}


def demo(cfg: DemoConfig) -> Path:
    """Run (or resume) the demo in ``cfg.out``; write and return ``REPORT.md``."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = resolve_preset(cfg.preset, cfg.quick)
    t0 = time.perf_counter()
    stages = ["data", "init", "pretrain", "align", "embed", "partition", "val", "dense"]
    n_stages = sum(s != "pretrain" or preset.get("pretrain") is not None for s in stages) - (not preset.get("eval_points"))
    p = Pipeline(cfg.out, cfg.seed, total=n_stages + preset["k"] + 1 + len(preset["routings"]), device=cfg.device)
    log.info("demo: preset %s%s, seed %d, run directory %s", cfg.preset, " (quick)" if cfg.quick else "",
             cfg.seed, p.root)
    names = run_core(p, preset)
    report = write_report(p, preset, names, title=f"ddfm demo — preset {cfg.preset}" + (" (quick)" if cfg.quick else ""),
                          command=_command(cfg), this_run_s=time.perf_counter() - t0)
    print(report.read_text().split("## ", 2)[1].split("\n", 1)[1].strip())  # the main table
    print(f"\ndemo: finished in {time.perf_counter() - t0:.0f} s; report: {report.resolve()}")
    return report


def _command(cfg: DemoConfig) -> str:
    parts = ["ddfm demo"]
    if cfg.preset != "image":
        parts.append(f"--preset {cfg.preset}")
    if cfg.quick:
        parts.append("--quick")
    if cfg.out != "runs/demo":
        parts.append(f"--out {cfg.out}")
    if cfg.seed:
        parts.append(f"--seed {cfg.seed}")
    if cfg.device != "auto":
        parts.append(f"--device {cfg.device}")
    return " ".join(parts)
