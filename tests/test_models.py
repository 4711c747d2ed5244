"""Presets, tokenizer, `ddfm init`, load_model and the one prompt format, on real images.

The tiny data file is built from real Fashion-MNIST and scikit-learn digits images (the
offline sources of ASSETS.md) plus a few text-only records.
"""

import json
from pathlib import Path

import pytest
from helpers.data import make_data

from ddfm.data import load_records, open_image
from ddfm.init import InitConfig, init
from ddfm.model.build import BUILDERS
from ddfm.model.chat import encode_conversation, render_prompt, to_chat_messages
from ddfm.model.checkpoint import load_model
from ddfm.model.presets import PRESETS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def llava_dir(data, tmp_path_factory):
    return init(InitConfig(preset="tiny-llava", data=str(data), out=str(tmp_path_factory.mktemp("m") / "init")))


def test_presets_are_data():
    for name, preset in PRESETS.items():
        assert preset["builder"] in BUILDERS and preset["kind"] in ("vlm", "lm"), name
        if "gguf" in preset:  # a pretrained language model: its own config and context
            assert set(preset["gguf"]) == {"package", "file"}
        else:
            assert preset["text"]["max_position_embeddings"] >= 128


def test_init_loads_with_plain_transformers(llava_dir, data):
    from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(llava_dir)
    processor = AutoProcessor.from_pretrained(llava_dir)
    tokenizer = AutoTokenizer.from_pretrained(llava_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    assert "Pil" in type(processor.image_processor).__name__  # works without torchvision
    assert tokenizer.convert_tokens_to_ids("<image>") == model.config.image_token_id
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e6 < n_params < 2e7
    meta = json.loads((llava_dir / "ddfm.json").read_text())
    assert meta["preset"] == "tiny-llava" and meta["stage"] == "init"
    # the data file relative to the checkpoint directory, resolved by read_meta
    from ddfm.model.checkpoint import read_meta
    assert not Path(meta["data"]).is_absolute()
    assert read_meta(llava_dir)["data"] == str(Path(data).resolve())


def test_small_llava_preset_is_the_tiny_one_with_a_bigger_language_model(data, tmp_path):
    small, _ = load_model(init(InitConfig(preset="small-llava", data=str(data), out=str(tmp_path / "small"))))
    text = sum(p.numel() for p in small.model.language_model.parameters())
    assert 2.5e7 < text < 3e7  # 109 MB in fp32: more than the L3 of the machines we bench on
    assert small.config.text_config.hidden_size == 512 and small.config.text_config.num_hidden_layers == 8
    assert PRESETS["small-llava"]["vision"] == PRESETS["tiny-llava"]["vision"]


def test_image_expansion_matches_processor(llava_dir, data):
    model, processor = load_model(llava_dir)
    assert not model.training
    record = load_records(data).records[0]
    image = open_image(record.image_path)
    conv = encode_conversation(processor, record.conversations, [image])
    ids, mask = conv.ids, conv.mask
    assert sum(t == model.config.image_token_id for t in ids) == (28 // 7) ** 2  # 16 patches, CLS dropped
    assert conv.vision["pixel_values"].shape == (1, 3, 28, 28)
    messages = to_chat_messages(record.conversations)
    prompt = render_prompt(processor, messages[:1], add_generation_prompt=True)
    enc = processor(text=prompt, images=[image], return_tensors="pt")
    prompt_ids = enc["input_ids"][0].tolist()
    assert ids[: len(prompt_ids)] == prompt_ids  # training ids == inference ids
    assert not any(mask[: len(prompt_ids)]) and all(mask[len(prompt_ids):])
    answer = processor.tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert answer.startswith(record.answer()) and processor.tokenizer.eos_token in answer
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == len(prompt_ids) + 3


def test_to_chat_messages_and_render():
    conv = [{"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat is this?"},
            {"from": "gpt", "value": "A bag."}]
    msgs = to_chat_messages(conv)
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    assert to_chat_messages(msgs) == msgs  # HF messages pass through


def test_tiny_lm_init_and_text_only(data, tmp_path):
    text_only = tmp_path / "text.jsonl"
    text_only.write_text("".join(line + "\n" for line in data.read_text().splitlines() if '"image": null' in line))
    out = init(InitConfig(preset="tiny-lm", data=str(text_only), out=str(tmp_path / "lm")))
    model, tok = load_model(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    conv = [{"from": "human", "value": "What is 1 plus 2?"}, {"from": "gpt", "value": "3"}]
    enc = encode_conversation(tok, conv)
    assert tok.decode([t for t, m in zip(enc.ids, enc.mask) if m]).startswith("3")
    with pytest.raises(ValueError, match="text-only"):
        render_prompt(tok, to_chat_messages([{"from": "human", "value": "<image>\nhi"}]))


def test_init_rejects_images_for_text_preset(data, tmp_path):
    with pytest.raises(ValueError, match="text-only"):
        init(InitConfig(preset="tiny-lm", data=str(data), out=str(tmp_path / "x")))
    with pytest.raises(ValueError, match="preset"):
        InitConfig(preset="nope")


@pytest.mark.slow
def test_smollm2_preset_is_the_real_pretrained_language_model(data, tmp_path):
    """smollm2-llava: SmolLM2-135M-Instruct's real weights (GGUF, dequantised), its own
    tokenizer and chat template (+ <image>), a small vision tower and projector."""
    from transformers import AutoTokenizer

    from ddfm.ensemble import Ensemble, Request
    from ddfm.model.build import gguf_path
    from ddfm.model.presets import SMOLLM2_CHAT_TEMPLATE

    out = init(InitConfig(preset="smollm2-llava", data=str(data), out=str(tmp_path / "smol")))
    model, processor = load_model(out)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    text = model.model.language_model
    assert sum(p.numel() for p in text.parameters()) == 134_515_008 + 576  # + the <image> row
    path = gguf_path(PRESETS["smollm2-llava"])
    original = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = processor.tokenizer
    assert len(tok) == len(original) + 1 == 49_153 and tok.convert_tokens_to_ids("<image>") == 49_152
    chat = [{"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5"}]
    assert original.apply_chat_template(chat, tokenize=False) == \
        tok.apply_chat_template(chat, tokenize=False, chat_template=SMOLLM2_CHAT_TEMPLATE)
    # the pretrained model answers (random weights would not), and an image record encodes
    ens = Ensemble.from_pretrained([str(out)], mode="uniform")
    assert "5" in ens.generate(Request("What is 2 plus 3?"), max_new_tokens=12)[0].text
    record = load_records(data).records[0]
    conv = encode_conversation(processor, record.conversations, [open_image(record.image_path)])
    assert sum(t == model.config.image_token_id for t in conv.ids) == 16
    assert tok.decode([t for t, m in zip(conv.ids, conv.mask) if m]) == record.answer() + "<|im_end|>\n"


@pytest.mark.slow
def test_smollm2_dinov2_preset_has_both_halves_pretrained(data, tmp_path):
    """smollm2-dinov2: DINOv2-small's pretrained weights as the tower, SmolLM2 as the
    language model, a fresh projector; a plain HF directory that transformers' Auto
    classes load and generate with; 64 image tokens per 112-pixel image."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ddfm.model.dinov2 import load_dinov2_small

    out = init(InitConfig(preset="smollm2-dinov2", data=str(data), out=str(tmp_path / "sd")))
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    tower = load_dinov2_small().state_dict()
    for name, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, tower[name]), name
    record = load_records(data).records[0]
    conv = encode_conversation(processor, record.conversations, [open_image(record.image_path)])
    assert sum(t == model.config.image_token_id for t in conv.ids) == 64
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    enc = processor(images=[open_image(record.image_path).convert("RGB")],
                    text=[processor.apply_chat_template(chat, add_generation_prompt=True)], return_tensors="pt")
    with torch.inference_mode():
        new = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:]
    # ddfm's decoding of the same checkpoint gives transformers' greedy tokens
    from ddfm.ensemble import Ensemble, Request

    ens = Ensemble.from_pretrained([str(out)], mode="uniform")
    [gen] = ens.generate(Request("What is this?", image=open_image(record.image_path)), max_new_tokens=6)
    assert gen.text == processor.tokenizer.decode(new, skip_special_tokens=True)


@pytest.mark.slow
def test_a_gguf_preset_checkpoint_is_a_plain_float_one_that_trains_and_saves(data, tmp_path):
    """The GGUF file's quantization_config must not follow the dequantised weights into the
    checkpoint: transformers would then refuse to save the trained model."""
    from ddfm.train import TrainConfig, train

    out = init(InitConfig(preset="smollm2-llava", data=str(data), out=str(tmp_path / "smol")))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and "quantization_config" not in config["text_config"]
    trained = train(TrainConfig(init=str(out), data=str(data), out=str(tmp_path / "t"), steps=1, batch_size=2,
                                save_every=0))
    assert (trained / "model.safetensors").is_file()
