"""``TrainConfig``, the options of ``ddfm train``, and their vocabulary: parts, recipes, ``--match``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from ddfm.config import arg
from ddfm.model.families import family_of
from ddfm.runtime import DEVICE_HELP, check_device

# the trainable parts; which parameters each holds is written per family in
# ddfm/model/families.py (FAMILIES[model_type].parts)
PARTS = ("vision", "projector", "language")
# ``--loss-on``: the assistant's tokens (LLaVA's convention) or every token but the image's
LOSS_ON = ("answers", "all")
# ``--lora-targets``' default: the Llama / Qwen / Mistral names of the attention and MLP projections
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# named recipes: LLaVA trains projector + LM with a frozen vision tower, InternVL everything,
# "align" is LLaVA's first stage (projector only).
RECIPES: dict[str, tuple[str, ...]] = {
    "llava": ("projector", "language"),
    "internvl": ("vision", "projector", "language"),
    "align": ("projector",),
}
DEFAULT_STEPS, DEFAULT_BATCH_SIZE = 200, 16  # when neither given nor implied by --match


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
    # None = not given: the recipe of the model's family (resolve_recipe, once the model is loaded)
    train: Optional[str] = arg("what learns: recipe (llava, internvl, align) or comma list of vision,projector,"
                               "language (default: the model family's recipe: internvl for InternVL, "
                               "language for a causal LM, llava for the other VLMs)",
                               default=None)
    loss_on: str = arg("tokens in the loss: answers (the assistant's, LLaVA's convention) or all (every token of "
                       "the conversation but the image placeholders: experts that model whole conversations, "
                       "which the exact posterior router scores)", default="answers", choices=list(LOSS_ON))
    lora: int = arg("train the language model through LoRA adapters of this rank (peft; merged into its "
                    "weights at the end: the checkpoint stays a plain one); 0: every weight of --train's parts",
                    default=0)
    lora_alpha: float = arg("LoRA scale numerator: the adapter adds (alpha / rank) * B A", default=16.0)
    lora_dropout: float = arg("dropout on the adapters' input", default=0.0)
    lora_targets: list[str] = arg("last names of the language model's linear layers that get adapters",
                                  default_factory=lambda: list(LORA_TARGETS))
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
    device: str = arg(DEVICE_HELP, default="auto")
    log_every: int = arg("log a plain line every N steps when not on a terminal", default=10)
    eval_data: list[str] = arg("held-out data files whose answer loss is logged (log.jsonl eval_loss) before "
                               "training, every --eval-every steps and at the end", default_factory=list)
    eval_every: int = arg("steps between held-out losses (0: only before and after training)", default=0)
    parts: tuple[str, ...] = field(default=(), init=False)  # () until the recipe is resolved
    matched: dict | None = field(default=None, init=False)

    def __post_init__(self):
        self.parts = parse_parts(self.train) if self.train is not None else ()
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
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.warmup < 0 or self.save_every < 0 or self.eval_every < 0:
            raise ValueError("--warmup, --save-every and --eval-every must be >= 0")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"--loss-on {self.loss_on!r}: one of {', '.join(LOSS_ON)}")
        if self.lora < 0 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"--lora must be >= 0 (got {self.lora}), --lora-alpha > 0 (got {self.lora_alpha}) "
                             f"and --lora-dropout in [0, 1) (got {self.lora_dropout})")
        if self.lora and self.fsdp:
            raise ValueError("--lora with --fsdp is not supported: the adapters are small, train them with DDP "
                             "(torchrun without --fsdp)")
        if self.lora and self.parts and "language" not in self.parts:
            raise ValueError(f"--lora adapts the language model, but --train {self.train} does not train it")
        check_device(self.device)


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


def resolve_recipe(cfg: TrainConfig, model_config) -> TrainConfig:
    """``cfg`` with ``--train`` given, else with the recipe of the model's family (``Family.recipe``).

    The resolved value is what ddfm.json records and the resume state is keyed by, so a run
    that named the recipe and one that left it to the model are the same run.
    """
    if cfg.train is not None:
        return cfg
    return replace(cfg, train=family_of(model_config).recipe)


def cluster_id(cfg: TrainConfig) -> int | None:
    """``--cluster``, else the number of a ``shard-XX.jsonl`` file name, else None."""
    if cfg.cluster is not None:
        return cfg.cluster
    m = re.fullmatch(r"shard-(\d+)\.jsonl?", Path(cfg.data).name)
    return int(m.group(1)) if m else None
