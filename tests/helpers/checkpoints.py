"""Tiny random-weight checkpoints of every VLM family ddfm supports, built offline.

Each checkpoint is what a user's local directory of that family holds, at toy size:
the family's ``transformers`` config and model class (random weights), a byte-level BPE
tokenizer trained here on the test data with the family's special tokens, the family's
image processor (PIL backend) and processor class, and a chat template written in the
family's own format (role markers, image placeholder, end-of-turn token). The processor is
saved with :func:`ddfm.model.families.images_only` (no video processor: torchvision is not in the
default environment); ``processor_config.json`` names the family's own processor class.

:data:`FAMILIES` maps a name to a builder; :func:`build` writes one checkpoint directory.
The image sizes are chosen so that the test images (28x28 Fashion-MNIST, 42x56 digits)
expand to different numbers of image tokens in every family with dynamic resolution.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ddfm.data import load_records, open_image
from ddfm.model.build import corpus_text
from ddfm.model.chat import to_chat_messages
from ddfm.model.families import images_only
from helpers.data import make_data

# ------------------------------------------------------------------ chat templates
# In each family's own format (shortened from the released checkpoints' templates: the
# same role markers, placeholders and end-of-turn tokens; no tool or video branches).

CHATML_SYSTEM = "You are a helpful assistant."

# Qwen2-VL / Qwen2.5-VL: ChatML with a default system turn, images as vision_start/pad/end
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + CHATML_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# InternVL (transformers-native): ChatML, an image is <IMG_CONTEXT> on its own line
INTERNVL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n" + CHATML_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<IMG_CONTEXT>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-OneVision (Qwen2 language model): "<|im_start|>user <image>\nWhat...<|im_end|>": the role, a
# space, images first, each text on a new line; answers in {% generation %} blocks (the
# template's own assistant mask), and the generation prompt is "<|im_start|>assistant\n"
ONEVISION_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% if message['content'] is string %}{{ '\n' + message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\n' + content['text'] }}"
    "{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endif %}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# LLaVA-1.5: "USER: <image>\n... ASSISTANT: ...", the answer closed by eos
LLAVA_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}<image>\n{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %} {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

# Idefics3 / SmolVLM: "User:<image>...<end_of_utterance>\nAssistant: ..."
IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}{{ ': ' + message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


# ------------------------------------------------------------------ tokenizer

def tokenizer(texts, specials: list[str], *, bos: str | None, eos: str, pad: str, template: str,
              extra: dict | None = None, vocab_size: int = 1024):
    """A byte-level BPE trained on ``texts`` with the family's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    named = {t for t in (bos, eos, pad) if t}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   additional_special_tokens=[s for s in specials if s not in named],
                                   extra_special_tokens=extra or {}, chat_template=template,
                                   model_max_length=2048, padding_side="left")


def _texts(records):
    return list(corpus_text(records)) + [CHATML_SYSTEM, "USER: ASSISTANT: User: Assistant: user assistant system"]


def _text_config(kind: str, vocab: int, tok, **extra):
    from transformers import LlamaConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=tok.pad_token_id,
               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **extra)


# ------------------------------------------------------------------ families

def llava(records):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tok = tokenizer(_texts(records), ["<pad>", "<s>", "</s>", "<image>"], bos="<s>", eos="</s>", pad="<pad>",
                    template=LLAVA_TEMPLATE, extra={"image_token": "<image>"})
    vision = CLIPVisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=_text_config("llama", len(tok), tok),
                         image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                         vision_feature_select_strategy="default")
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28},
                                                                      crop_size={"height": 28, "width": 28}),
                               tokenizer=tok, patch_size=7, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE)
    return LlavaForConditionalGeneration(config), processor


def llava_onevision(records):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        LlavaOnevisionProcessor,
        SiglipVisionConfig,
    )

    tok = tokenizer(_texts(records), ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"],
                    bos=None, eos="<|im_end|>", pad="<|endoftext|>", template=ONEVISION_TEMPLATE,
                    extra={"image_token": "<image>", "video_token": "<video>"})
    pinpoints = [[28, 28], [28, 56], [56, 28], [56, 56]]
    vision = SiglipVisionConfig(image_size=28, patch_size=7, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_text_config("qwen2", len(tok), tok),
                                  image_token_id=tok.convert_tokens_to_ids("<image>"),
                                  video_token_id=tok.convert_tokens_to_ids("<video>"),
                                  image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    ip = LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, image_grid_pinpoints=pinpoints)
    processor = images_only(LlavaOnevisionProcessor)(
        image_processor=ip, tokenizer=tok, num_image_tokens=16, vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9", chat_template=ONEVISION_TEMPLATE)
    return LlavaOnevisionForConditionalGeneration(config), processor


def internvl(records):
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVisionConfig,
    )

    names = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
             "video_token": "<video>"}
    tok = tokenizer(_texts(records), ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *names.values()], bos=None,
                    eos="<|im_end|>", pad="<|endoftext|>", template=INTERNVL_TEMPLATE, extra=names)
    vision = InternVLVisionConfig(image_size=[28, 28], patch_size=[7, 7], hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2)
    config = InternVLConfig(vision_config=vision, text_config=_text_config("qwen2", len(tok), tok),
                            image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                            vision_feature_layer=-1, vision_feature_select_strategy="default")
    ip = GotOcr2ImageProcessorPil(size={"height": 28, "width": 28}, crop_to_patches=True, min_patches=1,
                                  max_patches=4)
    processor = images_only(InternVLProcessor)(image_processor=ip, tokenizer=tok, image_seq_length=4,
                                               chat_template=INTERNVL_TEMPLATE)
    return InternVLForConditionalGeneration(config), processor


def _qwen_vl(records, version: str):
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = tokenizer(_texts(records), specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                    template=QWEN_VL_TEMPLATE)
    ids = {t: tok.convert_tokens_to_ids(t) for t in specials}
    prefix = {"2": "Qwen2VL", "2.5": "Qwen2_5_VL"}[version]
    text = {**_text_config("qwen2", len(tok), tok).to_dict(),  # M-RoPE sections: head_dim 16 / 2 = 2 + 3 + 3
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}}
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=7, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3)
    if version == "2.5":
        vision = dict(depth=2, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2, patch_size=7,
                      spatial_merge_size=2, temporal_patch_size=2, in_channels=3, window_size=28,
                      fullatt_block_indexes=[1])
    config = getattr(transformers, prefix + "Config")(
        text_config={**text, "model_type": getattr(transformers, prefix + "TextConfig").model_type},
        vision_config=vision, image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    # 7-pixel patches merged 2x2: a 28x28 image is 4 tokens, a 56x42 one 12
    ip = Qwen2VLImageProcessorPil(patch_size=7, merge_size=2, temporal_patch_size=2,
                                  size={"shortest_edge": 14 * 14, "longest_edge": 56 * 56})
    processor = images_only(getattr(transformers, prefix + "Processor"))(image_processor=ip, tokenizer=tok,
                                                                          chat_template=QWEN_VL_TEMPLATE)
    return getattr(transformers, prefix + "ForConditionalGeneration")(config), processor


def qwen2_vl(records):
    return _qwen_vl(records, "2")


def qwen2_5_vl(records):
    return _qwen_vl(records, "2.5")


def _idefics3_like(records, prefix: str):
    import transformers

    grid = [f"<row_{r}_col_{c}>" for r in range(1, 5) for c in range(1, 5)]
    specials = ["<|endoftext|>", "<|begin_of_text|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                "<global-img>", *grid]
    extra = {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
             "global_image_token": "<global-img>", "end_of_utterance_token": "<end_of_utterance>"}
    tok = tokenizer(_texts(records), specials, bos="<|begin_of_text|>", eos="<end_of_utterance>",
                    pad="<|endoftext|>", template=IDEFICS3_TEMPLATE, extra=extra)
    vision = getattr(transformers, prefix + "VisionConfig")(image_size=28, patch_size=7, hidden_size=32,
                                                             intermediate_size=64, num_hidden_layers=2,
                                                             num_attention_heads=2)
    config = getattr(transformers, prefix + "Config")(
        vision_config=vision.to_dict(), text_config=_text_config("llama", len(tok), tok).to_dict(), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    # 28-pixel tiles (4 tokens each after the 2x2 pixel shuffle); a 56x42 image is split into 2x2 tiles + a global one
    ip = getattr(transformers, prefix + "ImageProcessorPil")(size={"longest_edge": 56},
                                                             max_image_size={"longest_edge": 28},
                                                             do_image_splitting=True)
    cls = getattr(transformers, prefix + "Processor")
    if "video_processor" in cls.get_attributes():
        cls = images_only(cls)
    processor = cls(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=IDEFICS3_TEMPLATE)
    return getattr(transformers, prefix + "ForConditionalGeneration")(config), processor


def idefics3(records):
    return _idefics3_like(records, "Idefics3")


def smolvlm(records):
    return _idefics3_like(records, "SmolVLM")


FAMILIES: dict[str, Callable] = {
    "llava": llava, "llava_onevision": llava_onevision, "internvl": internvl, "qwen2_vl": qwen2_vl,
    "qwen2_5_vl": qwen2_5_vl, "idefics3": idefics3, "smolvlm": smolvlm,
}


# ------------------------------------------------------------------ data

DIGIT_SIZE = (56, 28)  # width, height: a wide image, unlike Fashion-MNIST's square ones


def family_data(root: Path) -> dict:
    """Real training and test records (:func:`helpers.data.make_data`), the digits made wide."""
    path = make_data(root, n_fashion=10, n_digits=10, n_text=4)
    test = make_data(root, n_fashion=4, n_digits=4, n_text=2, offset=100, name="test.jsonl")
    for f in (root / "images").glob("d*.png"):
        Image.open(f).resize(DIGIT_SIZE).save(f)
    return {"root": root, "train": path, "test": test, "records": load_records(path).records}


def conversations(data) -> list[tuple[list[dict], list]]:
    """(conversation, images): a Fashion-MNIST record, a digits one, a text one, and a
    three-turn conversation about one image."""
    recs = data["records"]
    fm, dg, tx = recs[0], next(r for r in recs if r.id.startswith("d")), recs[-1]
    multi = fm.conversations + [{"from": "human", "value": "And its colour?"}, {"from": "gpt", "value": "Grey."}]
    return [(fm.conversations, [open_image(fm.image_path)]), (dg.conversations, [open_image(dg.image_path)]),
            (tx.conversations, []), (multi, [open_image(fm.image_path)])]


def hf_messages(conversation: list[dict], images: list) -> list[dict]:
    """Chat messages with the PIL images in their image parts (for apply_chat_template)."""
    msgs, it = to_chat_messages(conversation), iter(images)
    return [{**m, "content": [{"type": "image", "image": next(it)} if p["type"] == "image" else p
                              for p in m["content"]]} for m in msgs]


def build(family: str, records, out: Path, seed: int = 0) -> Path:
    """Write a tiny random-weight checkpoint of ``family`` to ``out`` (HF files only, no ddfm.json)."""
    torch.manual_seed(seed)
    model, processor = FAMILIES[family](records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


_BUILT: dict[Path, Path] = {}


def built(family: str, data: dict) -> Path:
    """:func:`build` of ``family`` on ``data`` (from :func:`family_data`) into ``data["root"]/hf/family``,
    once per process: the tests only read these checkpoints."""
    out = data["root"] / "hf" / family
    if out not in _BUILT:
        _BUILT[out] = build(family, data["records"], out)
    return _BUILT[out]
