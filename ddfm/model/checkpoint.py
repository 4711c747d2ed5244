"""Checkpoints: Hugging Face directories, their ``ddfm.json``, saving and loading.

A checkpoint is an ordinary Hugging Face directory: ``config.json``, ``model.safetensors``,
tokenizer files and (for a vision-language model) the processor files, so it loads with
plain ``transformers``::

    AutoModelForImageTextToText.from_pretrained(DIR)  +  AutoProcessor.from_pretrained(DIR)
    AutoModelForCausalLM.from_pretrained(DIR)         +  AutoTokenizer.from_pretrained(DIR)

:func:`load_model` does that for any causal LM and the VLM families of
:mod:`ddfm.model.families`, whose processors it loads without torchvision.
``ddfm.json`` is ddfm's record of how the checkpoint was made (:func:`write_meta`,
:func:`read_meta`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ddfm.io import read_json, write_json
from ddfm.model.families import family_of, is_vision_language, load_processor

# ddfm.json fields that name files or directories, at any depth ("init_meta", "config",
# "skipped_images"): stored relative to the directory holding ddfm.json, so a moved tree of
# runs still resolves; write_meta relativises them, read_meta resolves them.
META_PATH_FIELDS = ("shard", "init", "data", "out", "file", "image", "from")


def _map_paths(meta: Any, fn) -> Any:
    if isinstance(meta, dict):
        return {k: fn(v) if k in META_PATH_FIELDS and isinstance(v, str) else _map_paths(v, fn)
                for k, v in meta.items()}
    if isinstance(meta, list):
        return [_map_paths(v, fn) for v in meta]
    return meta


def write_meta(out: str | os.PathLike, meta: dict) -> None:
    """Write ``out/ddfm.json``; path fields (relative to the working directory, or absolute)
    are stored relative to ``out``."""
    base = os.path.abspath(out)
    write_json(Path(out) / "ddfm.json", _map_paths(meta, lambda v: os.path.relpath(os.path.abspath(v), base)))


def read_meta(checkpoint: str | os.PathLike) -> dict | None:
    """A checkpoint's ``ddfm.json`` with every path field resolved to an absolute path
    (relative to the checkpoint directory), or None when there is none."""
    path = Path(checkpoint) / "ddfm.json"
    if not path.is_file():
        return None
    base = Path(checkpoint).resolve()
    return _map_paths(read_json(path), lambda v: os.path.normpath(base / v))  # an absolute v stays itself


# files of a checkpoint directory that are ddfm's bookkeeping, not the checkpoint's own
_NOT_CHECKPOINT = ("ddfm.json", "log.jsonl", "DONE.json")
_MODEL_FILES = ("config.json", "generation_config.json")


def checkpoint_files(path: Path, *, model: bool) -> list[Path]:
    """Top-level files of a HF checkpoint directory: the model's (``model=True``: config,
    weights) or the rest (tokenizer, processor, chat template, ...); never ddfm's."""
    def is_model(f: Path) -> bool:
        return f.name in _MODEL_FILES or f.name.startswith(("model", "pytorch_model")) and (
            f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"))

    return sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.name not in _NOT_CHECKPOINT and is_model(f) == model)


def save_checkpoint(model, processor, out: str | os.PathLike, meta: dict | None = None,
                    processor_files: str | os.PathLike | None = None, state_dict: dict | None = None) -> Path:
    """Save model (safetensors) + processor/tokenizer as a HF directory, then ``ddfm.json``.

    ``state_dict``: the weights to write instead of the model's own (a sharded model's,
    gathered by :func:`ddfm.train.fsdp.full_state_dict`).

    Files are written into a temporary sibling directory and each moved into ``out`` with
    an atomic rename; ``ddfm.json`` comes last, so its presence marks a complete
    checkpoint. Other files in ``out`` (a training log, the resume state) are kept.
    ``meta``'s path fields are stored relative to ``out`` (:func:`write_meta`).
    ``processor_files``: the checkpoint the processor came from; an images-only processor
    (``ddfm.model.families.images_only``) has its files copied from there unchanged (they keep
    the family's video-processor settings), any other is saved with ``save_pretrained``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if processor_files is not None and getattr(processor, "images_only", False):
            for f in checkpoint_files(Path(processor_files), model=False):
                shutil.copy2(f, tmp / f.name)
        else:
            processor.save_pretrained(tmp)
        (out / "ddfm.json").unlink(missing_ok=True)
        for f in sorted(tmp.iterdir()):
            os.chmod(f, 0o644)
            os.replace(f, out / f.name)
        if meta is not None:
            write_meta(out, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out

# ---------------------------------------------------------------------------------------
# loading

def load_model(path: str | os.PathLike, *, device: str = "cpu", dtype=None):
    """Load a checkpoint directory with plain ``transformers``, in eval mode.

    Returns ``(model, processor)`` for a vision-language model
    (``AutoModelForImageTextToText`` + ``AutoProcessor``) or ``(model, tokenizer)`` for a
    causal LM (``AutoModelForCausalLM`` + ``AutoTokenizer``).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
    config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if is_vision_language(config):
        family_of(config)  # a VLM family ddfm does not read is an error here, naming the supported ones
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = load_processor(path, config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        processor = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), processor
