"""`ddfm train --fsdp` (FSDP2), `--activation-checkpointing` and the sharded resume state,
on real images with the tiny-llava preset: in one process (a one-rank FSDP group: the same
code path, fast) and with 2 gloo processes under torchrun (slow)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import checkpoints
from helpers.data import make_data
from safetensors.torch import load_file

from ddfm.init import InitConfig, init
from ddfm.train import IGNORE, Example, TrainConfig, ballast_example, rank_groups, sample_order, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # text-only records are a third of the shard: ranks often get a micro-batch without an image
    return make_data(tmp_path_factory.mktemp("data"), n_fashion=12, n_digits=12, n_text=12)


@pytest.fixture(scope="module")
def init_dir(data, tmp_path_factory):
    return init(InitConfig(preset="tiny-llava", data=str(data), out=str(tmp_path_factory.mktemp("m") / "init")))


def _losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "log.jsonl").read_text().splitlines()
            if "loss" in json.loads(line)]


def _cfg(init_dir, data, out, **kw):
    kw = {"steps": 6, "batch_size": 8, "lr": 3e-3, "warmup": 2, "save_every": 0, **kw}
    return TrainConfig(init=str(init_dir), data=str(data), out=str(out), **kw)


def _small_cfg(init_dir, data, out, **kw):
    """The one-process tests' config: batches of 4, half the two-rank runs' (the same code paths in half the time)."""
    return _cfg(init_dir, data, out, **{"batch_size": 4, **kw})


def _same_weights(a, b, atol=0.0):
    a, b = load_file(Path(a) / "model.safetensors"), load_file(Path(b) / "model.safetensors")
    assert a.keys() == b.keys()
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) if atol else torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ the batch split under FSDP

def _ex(i, image):
    return Example(str(i), [1, 2, 3 + i], [IGNORE, 2, 3], "img.png" if image else None, 2)


def test_fsdp_ranks_run_the_same_forwards_each_with_an_image():
    """Every rank runs one group per micro-batch (the all-gathers are collectives) and each
    group holds an image, a ballast one (no loss) where the micro-batch had none."""
    batch = [_ex(0, True), _ex(1, True), _ex(2, False), _ex(3, False)] * 2  # rank 1 gets text only
    ballast = ballast_example(batch)
    assert ballast.image and ballast.n_loss == 0 and set(ballast.labels) == {IGNORE}
    for rank in (0, 1):
        groups = rank_groups(batch, rank, world=2, micro=2, accum=2, sharded=True, ballast=ballast)
        assert len(groups) == 2 and all(any(e.image for e in g) for g in groups)
    assert rank_groups(batch, 1, 2, 2, 2, True, ballast)[0] == [batch[2], batch[3], ballast]
    assert ballast_example([_ex(0, False)]) is None  # a text-only shard: no rank runs the vision tower


# ------------------------------------------------------------------ one process (one-rank FSDP group)

@pytest.fixture(scope="module")
def plain_run(init_dir, data, tmp_path_factory):
    return train(_small_cfg(init_dir, data, tmp_path_factory.mktemp("plain") / "run", eval_data=[str(data)],
                            eval_every=3))


@pytest.fixture(scope="module")
def fsdp_run(init_dir, data, tmp_path_factory):
    return train(_small_cfg(init_dir, data, tmp_path_factory.mktemp("fsdp") / "run", fsdp=True, save_every=2,
                      eval_data=[str(data)], eval_every=3))


def _eval_losses(out):
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]["train"]) for r in rows if "eval_loss" in r]


def test_fsdp_in_one_process_matches_plain_training(plain_run, fsdp_run):
    assert _losses(fsdp_run) == pytest.approx(_losses(plain_run), abs=1e-5)
    # the held-out loss (every rank runs the same forwards: the sharded model needs it)
    assert [s for s, _ in _eval_losses(fsdp_run)] == [0, 3, 6]
    assert [v for _, v in _eval_losses(fsdp_run)] == pytest.approx([v for _, v in _eval_losses(plain_run)], abs=1e-5)
    assert _same_weights(plain_run, fsdp_run, atol=1e-4)
    state = torch.load(fsdp_run / "resume" / "state.pt", weights_only=True)
    assert "model" not in state and state["sharded"] == "sharded-00000006"
    assert sorted(p.name for p in (fsdp_run / "resume").iterdir()) == ["sharded-00000006", "state.pt"]
    memory = json.loads((fsdp_run / "ddfm.json").read_text())["compute"]["memory_per_rank"]
    assert memory == json.loads((plain_run / "ddfm.json").read_text())["compute"]["memory_per_rank"]


def test_sharded_and_plain_resume_states_are_not_mixed(init_dir, data, plain_run, fsdp_run):
    with pytest.raises(ValueError, match="written by a run with --fsdp; resume it with --fsdp"):
        train(_small_cfg(init_dir, data, fsdp_run, resume=True))
    with pytest.raises(ValueError, match="written by a run without --fsdp; resume it without --fsdp"):
        train(_small_cfg(init_dir, data, plain_run, fsdp=True, resume=True))


@pytest.mark.slow
def test_fsdp_in_one_process_resumes_exactly(init_dir, data, fsdp_run, tmp_path, monkeypatch):
    from ddfm.train.state import TrainLog

    write = TrainLog.write

    def interrupt_after_5(self, row):
        write(self, row)
        if row["step"] == 5:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "write", interrupt_after_5)
    with pytest.raises(KeyboardInterrupt):
        train(_small_cfg(init_dir, data, tmp_path / "run", fsdp=True, save_every=2))
    monkeypatch.setattr(TrainLog, "write", write)
    assert torch.load(tmp_path / "run" / "resume" / "state.pt", weights_only=True)["step"] == 4
    out = train(_small_cfg(init_dir, data, tmp_path / "run", fsdp=True, save_every=2, resume=True))
    assert _losses(out) == _losses(fsdp_run)  # bit for bit
    assert _same_weights(out, fsdp_run)
    meta = json.loads((out / "ddfm.json").read_text())["compute"]
    assert meta["resumes"] == 1 and meta["steps_redone"] == 1


@pytest.mark.slow
def test_activation_checkpointing_recomputes_each_block_and_changes_nothing(init_dir, data, tmp_path, monkeypatch):
    """With --activation-checkpointing each decoder block runs its forward twice per group
    (forward, then again in backward), and the run is the same bit for bit."""
    import ddfm.train.loop as train_mod
    from ddfm.train.fsdp import transformer_blocks

    calls = {"n": 0}
    set_trainable = train_mod.set_trainable

    def count_decoder_calls(model, parts):
        for block in transformer_blocks(model.model.language_model):  # inside the block: seen on recompute too
            block.mlp.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
        # training asks for no KV cache (transformers would build one, and refuse it under checkpointing)
        model.register_forward_pre_hook(lambda m, a, kw: calls.setdefault("use_cache", set()).add(kw.get("use_cache")),
                                        with_kwargs=True)
        return set_trainable(model, parts)

    monkeypatch.setattr(train_mod, "set_trainable", count_decoder_calls)
    plain = train(_small_cfg(init_dir, data, tmp_path / "plain", steps=2))
    n_plain, calls["n"] = calls["n"], 0
    ac = train(_small_cfg(init_dir, data, tmp_path / "ac", steps=2, activation_checkpointing=True))
    n_dry = 4  # the dry run's forward (no gradient, nothing to recompute) through the 4 decoder blocks
    assert n_plain > n_dry and calls["n"] - n_dry == 2 * (n_plain - n_dry)
    assert calls["use_cache"] == {False}
    assert _losses(ac) == _losses(plain)
    assert _same_weights(plain, ac)
    assert json.loads((ac / "ddfm.json").read_text())["config"]["activation_checkpointing"] is True


@pytest.mark.slow
def test_fsdp_bf16_policy_computes_in_bf16_and_keeps_fp32_weights(init_dir, data, tmp_path, monkeypatch):
    """On CPU too, --fsdp --bf16 is FSDP's MixedPrecisionPolicy: blocks see bf16 weights,
    the master weights and the saved checkpoint stay fp32."""
    import ddfm.train.fsdp as fsdp_mod

    seen = set()
    shard = fsdp_mod.shard_model

    def record_dtypes(model, *args, **kw):
        shard(model, *args, **kw)
        for block in fsdp_mod.transformer_blocks(model):
            block.register_forward_pre_hook(lambda m, _: seen.update(p.dtype for p in m.parameters()))

    monkeypatch.setattr(fsdp_mod, "shard_model", record_dtypes)
    out = train(_small_cfg(init_dir, data, tmp_path / "bf16", steps=3, fsdp=True, bf16=True))
    assert seen == {torch.bfloat16}
    fp32 = train(_small_cfg(init_dir, data, tmp_path / "fp32", steps=3, fsdp=True))
    assert torch.float32 in seen
    assert _losses(out) == pytest.approx(_losses(fp32), rel=2e-2) and _losses(out) != _losses(fp32)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


@pytest.mark.slow
def test_fsdp_keeps_fp32_master_weights_of_a_half_precision_checkpoint(init_dir, data, tmp_path):
    """Real checkpoints come in fp16/bf16 (LLaVA-1.5-7B: fp16) and transformers loads them so;
    under --fsdp the sharded master weights, gradients and AdamW state are fp32."""
    import shutil

    from transformers import AutoModelForImageTextToText

    half = tmp_path / "bf16-init"
    shutil.copytree(init_dir, half)
    model = AutoModelForImageTextToText.from_pretrained(init_dir, dtype=torch.bfloat16)
    model.save_pretrained(half)
    assert {t.dtype for t in load_file(half / "model.safetensors").values()} == {torch.bfloat16}
    out = train(_small_cfg(half, data, tmp_path / "run", steps=1, fsdp=True))
    memory = json.loads((out / "ddfm.json").read_text())["compute"]["memory_per_rank"]
    assert memory["parameters"] == [4 * sum(p.numel() for p in model.parameters())]
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}


def test_memory_estimate_counts_the_real_llava_7b():
    """docs/training.md's per-rank memory of a LLaVA-1.5-7B expert under FSDP starts from these
    parameter counts: the model built from its configuration on the meta device (no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from ddfm.train import set_trainable
    from ddfm.train.fsdp import transformer_blocks

    config = LlavaConfig(  # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14-336, 2-layer MLP projector, Vicuna-7B
        vision_config=CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                       num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
        text_config=LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                                num_key_value_heads=32, vocab_size=32064, tie_word_embeddings=False),
        image_token_index=32000, projector_hidden_act="gelu", vision_feature_layer=-2)
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    counts = set_trainable(model, ("projector", "language"))
    blocks = transformer_blocks(model)
    root = sum(p.numel() for p in model.parameters()) - sum(p.numel() for b in blocks for p in b.parameters())
    readme = (ROOT / "docs" / "training.md").read_text()
    for name, n in [("vision", 303_507_456), ("projector", 20_979_712), ("language", 6_738_939_904)]:
        assert counts[name] == n and f"{n:,}" in readme, name
    assert sum(counts.values()) == 7_063_427_072 and "7,063,427,072" in readme
    assert counts["projector"] + counts["language"] == 6_759_919_616 and "6,759,919,616" in readme
    assert {type(b).__name__: sum(p.numel() for p in b.parameters()) for b in blocks} == \
        {"CLIPEncoderLayer": 12_596_224, "LlamaDecoderLayer": 202_383_360} and "202,383,360" in readme
    assert root == 284_850_176 and "284,850,176" in readme


# ------------------------------------------------------------------ two processes (torchrun, gloo)

def _kill_tree(pid):
    """SIGKILL a process and all its descendants (children first listed, then killed together)."""
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            todo += [int(c) for c in (task / "children").read_text().split()]
    for p in tree:
        os.kill(p, signal.SIGKILL)


def _torchrun(*args, port, **kw):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             f"--master_port={port}", "-m", "ddfm", "train", *map(str, args)],
                            env=ENV, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _common(init_dir, data, steps=8):
    return ["--init", init_dir, "--data", data, "--steps", steps, "--batch-size", 8, "--grad-accum", 2,
            "--lr", 3e-3, "--warmup", 2, "--seed", 3]


@pytest.fixture(scope="module")
def two_rank_run(init_dir, data, tmp_path_factory):
    """One 2-process FSDP run (llava recipe: frozen vision tower) with checkpoints every 4 steps."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    run = _torchrun(*_common(init_dir, data), "--save-every", 4, "--fsdp", "--out", out, port=29541)
    assert run.wait() == 0, run.stdout.read()[-4000:]
    return out


@pytest.mark.slow
def test_two_rank_fsdp_matches_one_process_and_halves_memory(init_dir, data, two_rank_run, tmp_path):
    # the split really puts image-less micro-batches on a rank (the ballast path runs)
    from ddfm.data import load_records

    has_image = [r.has_image for r in load_records(data).records]
    text_only = [all(not has_image[i] for i in sample_order(len(has_image), 3, s * 8, 8)[m * 2:(m + 1) * 2])
                 for s in range(8) for m in range(4)]
    assert any(text_only)
    single = train(_cfg(init_dir, data, tmp_path / "single", steps=8, grad_accum=2, seed=3))
    l1, l2 = _losses(single), _losses(two_rank_run)
    assert len(l1) == len(l2) == 8 and max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5, (l1, l2)
    assert _same_weights(single, two_rank_run, atol=1e-4)
    one = json.loads((single / "ddfm.json").read_text())["compute"]["memory_per_rank"]
    two = json.loads((two_rank_run / "ddfm.json").read_text())["compute"]
    assert two["world_size"] == 2
    for kind in ("parameters", "gradients", "optimizer"):
        assert len(two["memory_per_rank"][kind]) == 2
        for per_rank in two["memory_per_rank"][kind]:
            assert 0.49 < per_rank / one[kind][0] < 0.52, (kind, per_rank, one[kind])
    # only the trainable parts (projector + language model) have gradients and AdamW state
    trainable = sum(v for k, v in json.loads((single / "ddfm.json").read_text())["trainable"]["parameters"].items()
                    if k != "vision")
    assert one["gradients"][0] == 4 * trainable and one["optimizer"][0] > 8 * trainable


@pytest.mark.slow
def test_consolidated_checkpoint_is_the_trained_model(init_dir, data, two_rank_run, tmp_path):
    """The final directory loads with plain transformers and gives the logits of the trained
    (sharded) model: the last resume state's shards, read back with DCP's own converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ddfm.data import load_records, open_image
    from ddfm.model.chat import encode_conversation

    state = torch.load(two_rank_run / "resume" / "state.pt", weights_only=True)
    assert state["step"] == 8 and state["sharded"] == "sharded-00000008"
    shards = sorted(p.name for p in (two_rank_run / "resume" / state["sharded"]).iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # one file per rank
    dcp_to_torch_save(two_rank_run / "resume" / state["sharded"], tmp_path / "full.pt")
    trained_weights = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    trained = AutoModelForImageTextToText.from_pretrained(init_dir).eval()
    trained.load_state_dict(trained_weights)
    loaded = AutoModelForImageTextToText.from_pretrained(two_rank_run).eval()
    processor = AutoProcessor.from_pretrained(two_rank_run)
    record = next(r for r in load_records(data).records if r.has_image)
    enc = encode_conversation(processor, record.conversations, [open_image(record.image_path)])
    inputs = {"input_ids": torch.tensor([enc.ids]), **enc.vision}  # pixel_values (1, 3, H, W)
    with torch.no_grad():
        a = trained(**inputs).logits
        b = loaded(**inputs).logits
        init_logits = AutoModelForImageTextToText.from_pretrained(init_dir).eval()(**inputs).logits
    assert torch.equal(a, b)
    assert not torch.allclose(a, init_logits, atol=1e-3)  # it did train
    assert json.loads((two_rank_run / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]


@pytest.mark.slow
def test_two_rank_fsdp_killed_then_resumed_is_bitwise_identical(init_dir, data, two_rank_run, tmp_path):
    out = tmp_path / "run"
    common = [*_common(init_dir, data), "--save-every", 4, "--fsdp", "--out", out]
    killed = _torchrun(*common, port=29542)
    log = out / "log.jsonl"
    while killed.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= 6):
        time.sleep(0.005)
    _kill_tree(killed.pid)  # torchrun and both ranks (which run in sessions of their own), as a dead node
    killed.wait()
    assert not (out / "ddfm.json").exists(), "the run finished before it could be killed"
    assert torch.load(out / "resume" / "state.pt", weights_only=True)["step"] == 4
    resumed = _torchrun(*common, "--resume", port=29543)
    assert resumed.wait() == 0, resumed.stdout.read()[-4000:]
    assert _losses(out) == _losses(two_rank_run)
    assert _same_weights(out, two_rank_run)
    meta = json.loads((out / "ddfm.json").read_text())["compute"]
    assert meta["resumes"] == 1 and meta["steps_redone"] >= 2
    assert sorted(p.name for p in (out / "resume").iterdir()) == ["sharded-00000008", "state.pt"]


@pytest.mark.slow
def test_two_rank_fsdp_trains_everything_with_activation_checkpointing(init_dir, data, tmp_path):
    """The internvl recipe (vision tower trained too: its blocks' gradients are reduce-scattered,
    image-less micro-batches carry the ballast image) with checkpointing matches one process."""
    common = [*_common(init_dir, data, steps=4), "--train", "internvl", "--eval-data", data]
    run = _torchrun(*common, "--fsdp", "--activation-checkpointing", "--out", tmp_path / "fsdp", port=29546)
    assert run.wait() == 0, run.stdout.read()[-4000:]
    single = train(_cfg(init_dir, data, tmp_path / "single", steps=4, grad_accum=2, seed=3, train="internvl",
                        eval_data=[str(data)]))
    l1, l2 = _losses(single), _losses(tmp_path / "fsdp")
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5, (l1, l2)
    e1, e2 = _eval_losses(single), _eval_losses(tmp_path / "fsdp")  # before and after training, on both ranks
    assert [s for s, _ in e2] == [0, 4] and max(abs(a[1] - b[1]) for a, b in zip(e1, e2)) < 1e-5, (e1, e2)
    assert _same_weights(single, tmp_path / "fsdp", atol=1e-4)
    before, after = load_file(Path(init_dir) / "model.safetensors"), load_file(tmp_path / "fsdp" / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)


# ------------------------------------------------------------------ the VLM families

def _family(name, family_data):
    return checkpoints.built(name, family_data)


FAMILY_NAMES = ["llava", "llava_onevision", "internvl", "qwen2_vl", "qwen2_5_vl", "idefics3", "smolvlm"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_family_trains_sharded_with_checkpointing(family, family_data, tmp_path):
    """Each family's blocks (vision and language) shard and recompute: the same losses as
    plain training, and the consolidated checkpoint loads with plain transformers."""
    from ddfm.model.checkpoint import load_model

    init_dir = _family(family, family_data)
    kw = dict(steps=3, batch_size=4, lr=1e-2, warmup=0, train="internvl", device="cpu")
    plain = train(_cfg(init_dir, family_data["train"], tmp_path / "plain", **kw))
    sharded = train(_cfg(init_dir, family_data["train"], tmp_path / "fsdp", fsdp=True, activation_checkpointing=True,
                         **kw))
    assert _losses(sharded) == pytest.approx(_losses(plain), abs=1e-5)
    assert _same_weights(plain, sharded, atol=1e-4)
    model, _ = load_model(sharded)
    assert type(model).__name__ == json.loads((init_dir / "config.json").read_text())["architectures"][0]


@pytest.mark.slow
def test_two_rank_fsdp_on_qwen2_vl_with_an_image_less_micro_batch(family_data, tmp_path):
    """Dynamic resolution (each image its own grid of patches) and a rank whose micro-batch
    has no image (it carries the ballast): 2 ranks match one process."""
    from ddfm.data import load_records

    init_dir, shard = _family("qwen2_vl", family_data), family_data["train"]
    has_image = [r.has_image for r in load_records(shard).records]
    assert any(all(not has_image[i] for i in sample_order(len(has_image), 4, s * 4, 4)[m * 2:(m + 1) * 2])
               for s in range(4) for m in range(2))
    args = ["--init", init_dir, "--data", shard, "--steps", 4, "--batch-size", 4, "--lr", 1e-2, "--warmup", 0,
            "--seed", 4, "--train", "internvl", "--save-every", 0]
    run = _torchrun(*args, "--fsdp", "--out", tmp_path / "fsdp", port=29547)
    assert run.wait() == 0, run.stdout.read()[-4000:]
    single = train(_cfg(init_dir, shard, tmp_path / "single", steps=4, batch_size=4, lr=1e-2, warmup=0, seed=4,
                        train="internvl"))
    assert max(abs(a - b) for a, b in zip(_losses(single), _losses(tmp_path / "fsdp"))) < 1e-5
