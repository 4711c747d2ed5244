"""The ``init`` stage: the checkpoint every run starts from, from a preset or a local checkpoint.

    ddfm init --preset tiny-llava --data data/mix/train.jsonl --out runs/init
    ddfm init --from /models/Qwen2-VL-2B-Instruct --out runs/init     # a local HF checkpoint

From a preset (:data:`ddfm.model.presets.PRESETS`) it trains the tokenizer on the data's
text and writes a freshly initialised model; ``--from`` checks that ddfm can read a local
Hugging Face checkpoint and links (or copies) its files unchanged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddfm.config import arg
from ddfm.data import load_records
from ddfm.model.build import build_model
from ddfm.model.chat import encode_conversation
from ddfm.model.checkpoint import checkpoint_files, save_checkpoint, write_meta
from ddfm.model.families import family_of, load_processor
from ddfm.model.presets import PRESETS
from ddfm.runtime.provenance import versions

log = logging.getLogger(__name__)


@dataclass
class InitConfig:
    """``ddfm init``: write the initial checkpoint (tokenizer + model) from a preset, or
    take a local Hugging Face checkpoint (``--from DIR``) as it is."""

    preset: str = arg("model preset", default="tiny-llava", choices=tuple(PRESETS))
    data: str = arg("training data (JSONL) whose text trains the tokenizer", default="data/mix/train.jsonl")
    out: str = arg("output checkpoint directory", default="runs/init")
    seed: int = arg("seed of the weight initialisation", default=0)
    vocab_size: int | None = arg("BPE vocabulary size (default: the preset's)", default=None)
    from_dir: str | None = arg("a local Hugging Face checkpoint directory (LLaVA, LLaVA-OneVision, InternVL, "
                               "Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM or a causal LM) to start from instead of "
                               "a preset: checked, then its files linked or copied into --out", default=None,
                               short="--from")

    def __post_init__(self):
        if self.from_dir is not None and self.vocab_size is not None:
            raise ValueError("--vocab-size: a checkpoint given with --from keeps its own tokenizer")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.vocab_size is not None and self.vocab_size < 300:
            raise ValueError(f"--vocab-size must be >= 300 (256 bytes + special tokens), got {self.vocab_size}")


def init(cfg: InitConfig) -> Path:
    """Train the tokenizer on ``cfg.data``, build the preset's model, save it to ``cfg.out``
    (or, with ``cfg.from_dir``, :func:`init_from` that checkpoint)."""
    if cfg.from_dir is not None:
        return init_from(cfg.from_dir, cfg.out)
    records = load_records(cfg.data).records
    if not records:
        raise ValueError(f"{cfg.data}: no records to train the tokenizer on")
    if PRESETS[cfg.preset]["kind"] == "lm" and any(r.has_image for r in records):
        n = sum(r.has_image for r in records)
        raise ValueError(f"{cfg.data}: {n} record(s) have images but preset {cfg.preset!r} is text-only; "
                         "use a vision-language preset such as 'tiny-llava'")
    model, processor = build_model(cfg.preset, records, seed=cfg.seed, vocab_size=cfg.vocab_size)
    out = save_checkpoint(model, processor, cfg.out, meta={
        "stage": "init", "preset": cfg.preset, "preset_config": PRESETS[cfg.preset],
        "data": cfg.data, "records": len(records), "seed": cfg.seed,
        "parameters": sum(p.numel() for p in model.parameters()), "versions": versions()})
    log.info("init: %s (%s, %.2fM parameters, vocab %d) -> %s", cfg.preset, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, model.config.get_text_config().vocab_size, out)
    return out


def init_from(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A local Hugging Face checkpoint as the initial checkpoint, unchanged.

    Checks first that ddfm can read it — a supported family (``ddfm.model.families``), a
    processor or tokenizer that loads without torchvision, a chat template that renders,
    safetensors weights — then hard-links (or, across file systems, copies) every file
    into ``out`` through a temporary directory, and writes ``ddfm.json`` last.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    src = Path(source)
    if not (src / "config.json").is_file():
        raise ValueError(f"--from {source}: not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(src)
    family = family_of(config)
    weights = [f for f in checkpoint_files(src, model=True) if f.suffix == ".safetensors"]
    if not weights:
        raise ValueError(f"--from {source}: no safetensors weights (ddfm reads only safetensors)")
    processor = load_processor(src, config) if family.kind == "vlm" else AutoTokenizer.from_pretrained(src)
    probe = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]
    try:
        encode_conversation(processor, probe)
    except Exception as err:  # noqa: BLE001 - any failure to render or tokenize is this checkpoint's
        raise ValueError(f"--from {source}: the {family.name} checkpoint's chat template or tokenizer cannot "
                         f"encode a conversation: {err}") from err
    parameters = 0
    for f in weights:
        with safe_open(f, framework="pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                parameters += n
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for f in checkpoint_files(src, model=True) + checkpoint_files(src, model=False):
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
        (out / "ddfm.json").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
        write_meta(out, {"stage": "init", "from": str(src.resolve()), "family": family.name,
                         "model_type": config.model_type, "parameters": parameters, "versions": versions()})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("init: %s (%s, %.2fM parameters) from %s -> %s", family.name, config.model_type, parameters / 1e6,
             src, out)
    return out

