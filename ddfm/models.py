"""Models: presets, the tokenizer, the initial checkpoint and the ONE prompt format.

    ddfm init --preset tiny-llava --data data/mix/train.jsonl --out runs/init

A checkpoint is an ordinary Hugging Face directory: ``config.json``, ``model.safetensors``,
tokenizer files and (for a vision-language model) the processor files, so it loads with
plain ``transformers``::

    AutoModelForImageTextToText.from_pretrained(DIR)  +  AutoProcessor.from_pretrained(DIR)
    AutoModelForCausalLM.from_pretrained(DIR)         +  AutoTokenizer.from_pretrained(DIR)

:func:`load_model` does exactly that and accepts any local HF VLM or causal-LM directory.

Presets are data (:data:`PRESETS`): ``tiny-llava`` is a ``LlavaForConditionalGeneration``
(a small CLIP vision tower, the LLaVA MLP projector, a small Llama), ``small-llava`` the
same with a 27 M-parameter Llama, and ``tiny-lm`` a ``LlamaForCausalLM`` for text-only
corpora. Their tokenizer is a byte-level BPE trained on
the training text with ``tokenizers`` (:func:`train_tokenizer`).

The prompt format used by train, ensemble, eval and serve is one chain:
LLaVA turns --:func:`to_chat_messages`--> HF chat messages --:func:`render_prompt`--> text
(the checkpoint's own chat template), whose ``<image>`` placeholder the processor expands
to the vision tower's number of image tokens. :func:`encode_conversation` turns a
conversation into token ids plus the assistant-token mask used by the loss. Text is
tokenized as plain text (:func:`chat_ids`, :func:`encode_chat`): a control token spelled
in a message (``</s>``, ``<|assistant|>``) is the text it spells, never a turn marker.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    try:  # transformers 5: the PIL backend, no torchvision needed
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4: the slow processor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor

    size = preset["image_size"]
    vision = CLIPVisionConfig(image_size=size, **preset["vision"])
    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       **preset["text"])
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act=preset["projector_hidden_act"],
                         vision_feature_layer=preset["vision_feature_layer"],
                         vision_feature_select_strategy=preset["vision_feature_select_strategy"],
                         tie_word_embeddings=preset["text"].get("tie_word_embeddings", False))
    model = LlavaForConditionalGeneration(config)
    image_processor = ImageProcessor(size={"shortest_edge": size},
                                            crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, chat_template=CHAT_TEMPLATE,
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


BUILDERS = {"llava": _build_llava, "lm": _build_lm}


def build_model(preset_name: str, records: list, *, seed: int = 0, vocab_size: int | None = None):
    """Tokenizer trained on ``records`` and a freshly initialised model of a preset.

    Returns ``(model, processor_or_tokenizer)``; the model's weights depend only on
    ``seed`` and the tokenizer's size.
    """
    import torch

    preset = PRESETS[preset_name]
    with_image = preset["kind"] == "llava"
    tokenizer = train_tokenizer(corpus_text(records), vocab_size or preset["vocab_size"],
                                with_image=with_image,
                                max_length=preset["text"]["max_position_embeddings"])
    torch.manual_seed(seed)
    return BUILDERS[preset["kind"]](preset, tokenizer)


# ---------------------------------------------------------------------------------------
# ddfm init

@dataclass
class InitConfig:
    """``ddfm init``: write the initial checkpoint (tokenizer + model) from a preset."""

    preset: str = arg("model preset", default="tiny-llava", choices=tuple(PRESETS))
    data: str = arg("training data (JSONL) whose text trains the tokenizer", default="data/mix/train.jsonl")
    out: str = arg("output checkpoint directory", default="runs/init")
    seed: int = arg("seed of the weight initialisation", default=0)
    vocab_size: int | None = arg("BPE vocabulary size (default: the preset's)", default=None)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; known: {', '.join(PRESETS)}")
        if self.vocab_size is not None and self.vocab_size < 300:
            raise ValueError(f"--vocab-size must be >= 300 (256 bytes + special tokens), got {self.vocab_size}")


def init(cfg: InitConfig) -> Path:
    """Train the tokenizer on ``cfg.data``, build the preset's model, save it to ``cfg.out``."""
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
META_PATH_FIELDS = ("shard", "init", "data", "out", "file", "image")


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


def save_checkpoint(model, processor, out: str | os.PathLike, meta: dict | None = None) -> Path:
    """Save model (safetensors) + processor/tokenizer as a HF directory, then ``ddfm.json``.

    Files are written into a temporary sibling directory and each moved into ``out`` with
    an atomic rename; ``ddfm.json`` comes last, so its presence marks a complete
    checkpoint. Other files in ``out`` (a training log, the resume state) are kept.
    ``meta``'s path fields are stored relative to ``out`` (:func:`write_meta`).
    """
    import shutil
    import tempfile

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
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
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face checkpoint directory (no config.json): {path}")
    config = AutoConfig.from_pretrained(path)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if is_vision_language(config):
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        processor = AutoProcessor.from_pretrained(path)
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
    _chat_template(processor_or_tokenizer)
    msgs = messages if is_processor else _flatten(messages)
    return processor_or_tokenizer.apply_chat_template(msgs, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)


def chat_ids(processor_or_tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of chat messages, image placeholders unexpanded: :func:`render_prompt`'s
    text tokenized at once, with the messages' own text as plain text.

    transformers' contract ``apply_chat_template(..., sanitize_control_tokens=True)``:
    control tokens spelled inside the messages (``</s>``, ``<|assistant|>``, ``<image>``
    typed by a user) are encoded as the text they spell, only those the template writes
    are control tokens. A text holding none gets exactly the ids of the rendered prompt
    tokenized at once, as before (``ddfm train`` refuses data holding them).
    """
    _chat_template(processor_or_tokenizer)
    tokenizer = get_tokenizer(processor_or_tokenizer)
    msgs = messages if hasattr(processor_or_tokenizer, "image_processor") else _flatten(messages)
    return list(tokenizer.apply_chat_template(msgs, chat_template=processor_or_tokenizer.chat_template,
                                              add_generation_prompt=add_generation_prompt, tokenize=True,
                                              return_dict=False, sanitize_control_tokens=True))


def encode_chat(processor_or_tokenizer, messages: list[dict], images: list | None = None,
                add_generation_prompt: bool = True) -> tuple[list[int], dict | None]:
    """A prompt as the model takes it: ids (T,) with each image placeholder expanded by the
    processor, and the processor's vision inputs (``pixel_values``, ...; None without a
    processor). The messages' text is plain text, as in :func:`chat_ids`; ``images`` fill
    the messages' image parts in order."""
    if not hasattr(processor_or_tokenizer, "image_processor"):
        if images:
            raise ValueError("a text-only model cannot take an image")
        return chat_ids(processor_or_tokenizer, messages, add_generation_prompt), None
    _chat_template(processor_or_tokenizer)
    it = iter(images or [])
    msgs = [{**m, "content": [{**part, "image": next(it)} if part.get("type") == "image" else part
                              for part in m["content"]]} if isinstance(m["content"], list) else m
            for m in messages]
    enc = processor_or_tokenizer.apply_chat_template(msgs, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, return_dict=True, return_tensors="pt",
                                                     sanitize_control_tokens=True)
    vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")} or None
    return enc["input_ids"][0].tolist(), vision


def _chat_template(processor_or_tokenizer) -> str:
    template = getattr(processor_or_tokenizer, "chat_template", None)
    if template is None:
        raise ValueError(f"{type(processor_or_tokenizer).__name__} has no chat template; "
                         "the checkpoint directory needs one (chat_template.jinja)")
    return template


def num_image_tokens(processor) -> int:
    """How many placeholder tokens one image expands to, asked of the processor itself.

    Runs the processor on one blank image at its crop size and counts the image-token ids
    (LlavaProcessor: (H/patch)·(W/patch) + additional tokens − CLS if strategy "default").
    """
    from PIL import Image

    size = getattr(processor.image_processor, "crop_size", None) or {"height": 32, "width": 32}
    h, w = (size["height"], size["width"]) if not isinstance(size, int) else (size, size)
    enc = processor(text=processor.image_token, images=[Image.new("RGB", (w, h))], return_tensors="pt")
    return int((enc["input_ids"][0] == processor.image_token_id).sum())


def encode_conversation(processor_or_tokenizer, conversations: list[dict],
                        n_image_tokens: int | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and its assistant mask (the LLaVA loss mask).

    ``ids[i]`` is the i-th token of ``render_prompt(..., add_generation_prompt=False)``
    (tokenized by :func:`chat_ids`: the messages' text as plain text) with the image
    placeholder expanded to ``n_image_tokens`` copies; ``mask[i]`` is True
    for tokens of an assistant answer (including its closing eos). Assistant spans are
    found by rendering each prefix up to an assistant turn with the generation prompt, so
    any chat template works, and the ids are those of the full text tokenized at once —
    the same ids inference sees.
    """
    tokenizer = get_tokenizer(processor_or_tokenizer)
    messages = to_chat_messages(conversations)

    def ids_of(msgs, gen):
        return chat_ids(processor_or_tokenizer, msgs, add_generation_prompt=gen)

    full = ids_of(messages, False)
    mask = [False] * len(full)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(ids_of(messages[:i], True))
        end = len(ids_of(messages[: i + 1], False))
        for j in range(start, min(end, len(full))):
            mask[j] = True
    placeholder = image_token(processor_or_tokenizer)
    if placeholder is not None and n_image_tokens:
        image_id = tokenizer.convert_tokens_to_ids(placeholder)
        ids, out_mask = [], []
        for t, m in zip(full, mask):
            reps = n_image_tokens if t == image_id else 1
            ids += [t] * reps
            out_mask += [m] * reps
        return ids, out_mask
    return full, mask
