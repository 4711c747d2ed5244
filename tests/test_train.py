"""`ddfm train`: end to end on real images, compute matching, recipes, bad input,
exact resume after SIGKILL, and DDP (2 gloo processes) against one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.data import make_data
from safetensors.torch import load_file

from ddfm.init import InitConfig, init
from ddfm.model.checkpoint import load_model
from ddfm.train import TrainConfig, parse_match, sample_order, train

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("data"), n_fashion=24, n_digits=12, n_text=8)


@pytest.fixture(scope="module")
def init_dir(data, tmp_path_factory):
    return init(InitConfig(preset="tiny-llava", data=str(data), out=str(tmp_path_factory.mktemp("m") / "init")))


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _cfg(init_dir, data, out, **kw):
    kw = {"steps": 12, "batch_size": 8, "lr": 3e-3, "warmup": 2, "save_every": 0, **kw}
    return TrainConfig(init=str(init_dir), data=str(data), out=str(out), **kw)


def test_train_end_to_end(init_dir, data, tmp_path):
    shard = tmp_path / "shard-03.jsonl"  # cluster id comes from the name
    shard.write_text("".join(line.replace('"images/', f'"{data.parent}/images/') + "\n"
                             for line in data.read_text().splitlines()))
    out = train(_cfg(init_dir, shard, tmp_path / "expert", match="dense:12,16,2"))
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert set(rows[0]) >= {"step", "loss", "lr", "tokens_per_s", "elapsed"}
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"]  # it learns
    lrs = [r["lr"] for r in rows]
    assert lrs[0] < lrs[1] and lrs[-1] < max(lrs)  # warm-up then cosine decay
    from ddfm.model.checkpoint import read_meta

    meta = read_meta(out)
    assert meta["cluster"] == 3 and meta["init"] == str(Path(init_dir).resolve())
    c = meta["compute"]
    assert (c["steps"], c["batch_size"], c["samples_seen"]) == (12, 8, 96)
    assert c["match"]["dense_batch_size"] == 16 and c["match"]["k"] == 2
    assert c["tokens_seen"] == sum(r["tokens"] for r in rows)
    # plain transformers loads the result; the vision tower was frozen (llava recipe)
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(out)
    before = load_file(Path(init_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    vision = [k for k in before if "vision_tower" in k]
    proj = [k for k in before if "multi_modal_projector" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    assert all(not torch.equal(before[k], after[k]) for k in proj)
    assert model.config.image_token_id is not None


def test_internvl_recipe_trains_vision(init_dir, data, tmp_path):
    out = train(_cfg(init_dir, data, tmp_path / "ivl", steps=2, train="internvl"))
    before = load_file(Path(init_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    k = "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight"
    k = k if k in before else next(x for x in before if "vision_tower" in x and "q_proj.weight" in x)
    assert not torch.equal(before[k], after[k])


def test_align_recipe_trains_through_text_only_groups(init_dir, data, tmp_path):
    # the shard mixes image and text-only records; under "align" (projector only) a
    # text-only micro-batch touches nothing trainable and must not stop the run
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:
        if r["image"] is None:  # long passages: length grouping runs them as a group of their own
            r["conversations"][1]["value"] = " ".join(["plus one"] * 40)
        else:
            r["image"] = str(data.parent / r["image"])
    shard = tmp_path / "mixed.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = train(_cfg(init_dir, shard, tmp_path / "align", steps=3, train="align", batch_size=16))
    before = load_file(Path(init_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)


def test_match_and_parts_validation():
    m = parse_match("dense:400,32,4")
    assert (m["steps"], m["batch_size"]) == (400, 8)
    with pytest.raises(ValueError, match="divisible"):
        parse_match("dense:10,30,4")
    with pytest.raises(ValueError, match="dense:STEPS"):
        parse_match("400,32,4")
    with pytest.raises(ValueError, match="unknown part"):
        TrainConfig(init="x", data="y", out="z", train="vision,decoder")
    assert TrainConfig(init="x", data="y", out="z", train="llava").parts == ("projector", "language")


def test_sample_order_is_a_function_of_seed_and_position():
    a = sample_order(10, 0, 0, 25)
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:20]) == list(range(10))
    assert sample_order(10, 0, 7, 9) == a[7:16]
    assert sample_order(10, 1, 0, 10) != a[:10]


def test_bad_input_fails_before_training(init_dir, data, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        train(_cfg(init_dir, empty, tmp_path / "o1"))
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "x", "conversations": [{"from": "human", "value": "word " * 400},
                                                             {"from": "gpt", "value": "ok"}]}) + "\n")
    with pytest.raises(ValueError, match="longer than the model's context"):
        train(_cfg(init_dir, long, tmp_path / "o2"))
    special = tmp_path / "special.jsonl"
    special.write_text(json.dumps({"id": "s", "conversations": [{"from": "human", "value": "hi</s>"},
                                                                {"from": "gpt", "value": "ok"}]}) + "\n")
    with pytest.raises(ValueError, match="special token"):
        train(_cfg(init_dir, special, tmp_path / "o3"))
    with pytest.raises(ValueError, match="not divisible"):
        train(_cfg(init_dir, data, tmp_path / "o4", batch_size=6, grad_accum=4))
    assert not (tmp_path / "o1" / "log.jsonl").exists()


def test_images_need_a_vision_checkpoint(data, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(line + "\n" for line in data.read_text().splitlines() if '"image": null' in line))
    lm = init(InitConfig(preset="tiny-lm", data=str(text), out=str(tmp_path / "lm")))
    with pytest.raises(ValueError, match="text-only"):
        train(_cfg(lm, data, tmp_path / "o"))
    out = train(_cfg(lm, text, tmp_path / "lm-run", steps=3, train="language"))  # text-only trains
    model, _ = load_model(out)
    assert type(model).__name__ == "LlamaForCausalLM"


def _ddfm(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "ddfm", "train", *map(str, args)], env=ENV, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


@pytest.mark.slow
def test_cli_output_has_no_weight_loading_bars(init_dir, data, tmp_path):
    env = {k: v for k, v in ENV.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    run = subprocess.run([sys.executable, "-m", "ddfm", "train", "--init", init_dir, "--data", data, "--steps", "1",
                          "--batch-size", "2", "--out", str(tmp_path / "out")], env=env, cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Loading weights" not in run.stdout + run.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()


def _reference_then_killed(common: list, tmp_path, rows: int) -> None:
    """``common`` run to the end in tmp_path/ref, and again in tmp_path/run SIGKILLed once
    its log has ``rows`` rows (after a --save-every checkpoint, before the end)."""
    ref = _ddfm(*common, "--out", tmp_path / "ref")
    assert ref.wait() == 0, ref.stdout.read()
    killed = _ddfm(*common, "--out", tmp_path / "run")
    log = tmp_path / "run" / "log.jsonl"
    while killed.poll() is None and not (log.exists() and len(log.read_text().splitlines()) >= rows):
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run finished before it could be killed"


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(init_dir, data, tmp_path):
    common = ["--init", init_dir, "--data", data, "--steps", 60, "--batch-size", 4, "--lr", 3e-3,
              "--save-every", 5, "--seed", 7]
    _reference_then_killed(common, tmp_path, 23)
    assert not (tmp_path / "run" / "ddfm.json").exists()
    again = _ddfm(*common, "--out", tmp_path / "run")  # without --resume: refused
    assert again.wait() == 2 and "--resume" in again.stdout.read()
    resumed = _ddfm(*common, "--out", tmp_path / "run", "--resume")
    assert resumed.wait() == 0, resumed.stdout.read()
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ref_meta = json.loads((tmp_path / "ref" / "ddfm.json").read_text())["compute"]
    run_meta = json.loads((tmp_path / "run" / "ddfm.json").read_text())
    assert ref_meta["tokens_seen"] == run_meta["compute"]["tokens_seen"]
    # the log: each step once (the killed run's rows after its checkpoint are gone), time carried over
    rows = _log(tmp_path / "run")
    _check_log_after_resume(rows, 60, run_meta)
    assert [r["loss"] for r in rows] == [r["loss"] for r in _log(tmp_path / "ref")]
    assert run_meta["compute"]["resumes"] == 1 and run_meta["compute"]["steps_redone"] >= 3


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(init_dir, data, tmp_path):
    common = ["--init", init_dir, "--data", data, "--steps", 5, "--batch-size", 8, "--lr", 3e-3,
              "--train", "internvl", "--save-every", 0]
    single = _ddfm(*common, "--grad-accum", 2, "--out", tmp_path / "single")
    assert single.wait() == 0, single.stdout.read()
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          "--master_port=29533", "-m", "ddfm", "train", *map(str, common),
                          "--out", str(tmp_path / "ddp")], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    l1, l2 = [r["loss"] for r in _log(tmp_path / "single")], [r["loss"] for r in _log(tmp_path / "ddp")]
    assert len(l1) == len(l2) == 5
    assert max(abs(a - b) for a, b in zip(l1, l2)) < 1e-5, (l1, l2)
    assert json.loads((tmp_path / "ddp" / "ddfm.json").read_text())["compute"]["world_size"] == 2


def test_bf16_autocast_trains(init_dir, data, tmp_path):
    out = train(_cfg(init_dir, data, tmp_path / "bf16", steps=2, bf16=True))
    rows = _log(out)
    assert len(rows) == 2 and all(r["loss"] == r["loss"] for r in rows)  # finite, not NaN


@pytest.mark.slow
def test_torch_compile_matches_eager(init_dir, data, tmp_path):
    # CPU inductor needs only the C++ compiler; each new padded length recompiles (~30 s)
    eager = _log(train(_cfg(init_dir, data, tmp_path / "eager", steps=2)))
    from torch._dynamo.utils import counters

    counters.clear()
    compiled = _log(train(_cfg(init_dir, data, tmp_path / "compiled", steps=2, compile=True)))
    assert counters["stats"]["unique_graphs"] > 0  # dynamo really compiled the model
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)


def test_records_whose_image_failed_are_skipped_and_reported(init_dir, data, tmp_path, caplog):
    """A truncated PNG, garbage bytes and a missing file, each shared by two records: the run
    trains on the rest, logs one line and lists all six in ddfm.json (nothing crashes)."""
    import logging

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    for r in rows:
        if r["image"]:
            r["image"] = str(data.parent / r["image"])
    real = Path(rows[0]["image"]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(real[: len(real) // 2])
    (tmp_path / "garbage.png").write_bytes(b"definitely not a png" * 8)
    bad = []
    for name in ("truncated.png", "garbage.png", "gone.png"):
        for q in ("What is this?", "Name it."):
            bad.append({"id": f"{name}-{q[:4]}", "image": str(tmp_path / name), "source": "fashion-mnist",
                        "task": "name", "conversations": [{"from": "human", "value": f"<image>\n{q}"},
                                                          {"from": "gpt", "value": "A bag."}]})
    rows = rows[:3] + bad[:3] + rows[3:] + bad[3:]  # failed records among the good ones
    shard = tmp_path / "shard.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="ddfm"):
        out = train(_cfg(init_dir, shard, tmp_path / "run", steps=3))
    from ddfm.model.checkpoint import read_meta

    raw = json.loads((out / "ddfm.json").read_text())
    assert raw["skipped_images"]["records"][0]["file"] == "../shard.jsonl"  # relative to the run directory
    meta = read_meta(out)
    skipped = meta["skipped_images"]
    assert skipped["count"] == 6 and meta["examples"] == len(rows) - 6
    lines = {r["id"]: i + 1 for i, r in enumerate(rows)}
    assert sorted((s["id"], s["line"]) for s in skipped["records"]) == sorted((b["id"], lines[b["id"]]) for b in bad)
    reasons = {s["id"]: s["reason"] for s in skipped["records"]}
    assert all(s["file"] == str(shard) for s in skipped["records"])
    assert {Path(s["image"]).name for s in skipped["records"]} == {"truncated.png", "garbage.png", "gone.png"}
    assert all(Path(s["image"]).parent == tmp_path for s in skipped["records"])
    assert "truncated" in reasons["truncated.png-What"] and "cannot identify" in reasons["garbage.png-Name"]
    assert reasons["gone.png-What"].startswith("image file not found")
    assert "6 record(s) left out because their image failed" in caplog.text
    assert meta["compute"]["samples_seen"] == 3 * 8


def _check_log_after_resume(rows, steps, meta):
    """Each step exactly once, in order; elapsed and CPU time carried over the resume."""
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for key in ("elapsed", "cpu_s"):
        values = [r[key] for r in rows]
        assert all(b > a for a, b in zip(values, values[1:])), (key, values)
    c = meta["compute"]
    assert c["elapsed_s"] >= rows[-1]["elapsed"] and c["cpu_s"] >= rows[-1]["cpu_s"]


@pytest.mark.slow
def test_resume_truncates_the_log_and_carries_elapsed_time(init_dir, data, tmp_path, monkeypatch):
    """Interrupted after step 7 with a checkpoint at step 4: the resumed run's log holds each
    step once (steps 5-7 of the lost work are dropped) and time keeps counting from step 4."""
    from ddfm.train.state import TrainLog

    ref = _log(train(_cfg(init_dir, data, tmp_path / "ref", steps=10, save_every=4, batch_size=4)))
    write = TrainLog.write

    def interrupt_after_7(self, row):
        write(self, row)
        if row["step"] == 7:
            time.sleep(0.3)  # lost work: must not show up in the resumed run's elapsed time
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "write", interrupt_after_7)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(init_dir, data, tmp_path / "run", steps=10, save_every=4, batch_size=4))
    monkeypatch.setattr(TrainLog, "write", write)
    first = _log(tmp_path / "run")
    assert [r["step"] for r in first] == list(range(1, 8))
    t0 = time.perf_counter()
    out = train(_cfg(init_dir, data, tmp_path / "run", steps=10, save_every=4, batch_size=4, resume=True))
    resumed_wall = time.perf_counter() - t0
    rows = _log(out)
    meta = json.loads((out / "ddfm.json").read_text())
    _check_log_after_resume(rows, 10, meta)
    assert rows[:4] == first[:4]  # the rows up to the checkpoint are kept as written
    # the total is the time up to the checkpoint plus this session's training: the lost
    # steps 5-7 (and the 0.3 s after them) are not in it
    assert first[3]["elapsed"] < meta["compute"]["elapsed_s"] < first[3]["elapsed"] + resumed_wall
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]  # the same run, bit for bit on CPU
    assert meta["compute"]["resumes"] == 1 and meta["compute"]["steps_redone"] == 3
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_match_conflicting_with_an_explicit_steps_or_batch_size_is_an_error(capsys):
    from ddfm.cli import main

    with pytest.raises(ValueError, match=r"--steps 100 conflicts with --match dense:12,16,2.*--steps 12"):
        TrainConfig(init="x", data="y", out="z", steps=100, match="dense:12,16,2")
    with pytest.raises(ValueError, match=r"--batch-size 16 conflicts with --match dense:12,16,2.*--batch-size 8"):
        TrainConfig(init="x", data="y", out="z", batch_size=16, match="dense:12,16,2")
    same = TrainConfig(init="x", data="y", out="z", steps=12, batch_size=8, match="dense:12,16,2")  # agrees: fine
    assert (same.steps, same.batch_size) == (12, 8)
    implied = TrainConfig(init="x", data="y", out="z", match="dense:12,16,2")
    assert (implied.steps, implied.batch_size) == (12, 8)
    plain = TrainConfig(init="x", data="y", out="z")
    assert (plain.steps, plain.batch_size) == (200, 16)  # the documented defaults
    import dataclasses
    assert dataclasses.replace(implied, seed=3).steps == 12  # a resolved config stays valid
    assert main(["train", "--init", "x", "--data", "y", "--out", "z", "--match", "dense:12,16,2",
                 "--steps", "30"]) == 2
    err = capsys.readouterr().err
    assert "--steps 30 conflicts with --match dense:12,16,2" in err


def test_ddfm_json_paths_are_relative_to_the_run_directory(data, tmp_path, monkeypatch):
    """shard, init and data in ddfm.json (train's and init's) resolve from the run directory,
    so a tree of runs moved elsewhere still points at its own files."""
    import shutil

    from ddfm.model.checkpoint import read_meta

    root = tmp_path / "project"
    shutil.copytree(data.parent, root / "data")
    monkeypatch.chdir(root)  # paths given relative to the working directory, as on a command line
    init(InitConfig(preset="tiny-llava", data=f"data/{data.name}", out="init"))
    out = train(_cfg("init", f"data/{data.name}", "runs/dense", steps=2))
    raw = json.loads((root / out / "ddfm.json").read_text())
    assert raw["shard"] == f"../../data/{data.name}" and raw["init"] == "../../init"
    assert raw["init_meta"]["data"] == f"../../data/{data.name}"  # the init's ddfm.json, seen from here
    assert raw["config"]["data"] == f"../../data/{data.name}" and raw["config"]["out"] == "."
    assert json.loads((root / "init" / "ddfm.json").read_text())["data"] == f"../data/{data.name}"
    assert not any(isinstance(v, str) and str(tmp_path) in v for v in _walk(raw))  # no absolute path
    monkeypatch.chdir(tmp_path)
    shutil.move(root, tmp_path / "moved")
    meta = read_meta(tmp_path / "moved" / "runs" / "dense")
    moved = (tmp_path / "moved").resolve()
    assert meta["shard"] == str(moved / "data" / data.name) and Path(meta["shard"]).is_file()
    assert meta["init"] == str(moved / "init") and meta["init_meta"]["data"] == meta["shard"]
    assert meta["config"]["data"] == meta["shard"] and meta["config"]["out"] == str(moved / "runs" / "dense")
    assert read_meta(moved / "init")["data"] == meta["shard"]
    assert read_meta(tmp_path) is None  # not a checkpoint


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


@pytest.mark.slow
def test_resume_refuses_a_shard_that_changed_and_names_a_finished_run(init_dir, data, tmp_path, monkeypatch):
    """The resume state belongs to the examples it was trained on: a shard rewritten in
    between (here: one record fewer, same path, same options) would silently continue on
    another data order, so it is refused. A finished run is not called unfinished."""
    from ddfm.train.state import TrainLog

    shard = tmp_path / "shard.jsonl"
    lines = data.read_text().splitlines()
    shard.write_text("".join(line.replace('"images/', f'"{data.parent}/images/') + "\n" for line in lines))
    write = TrainLog.write

    def interrupt_after_3(self, row):
        write(self, row)
        if row["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainLog, "write", interrupt_after_3)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(init_dir, shard, tmp_path / "run", steps=4, save_every=2))
    monkeypatch.setattr(TrainLog, "write", write)
    shard.write_text("".join(line.replace('"images/', f'"{data.parent}/images/') + "\n"
                             for line in lines[1:]))
    with pytest.raises(ValueError, match=r"training examples .* changed"):
        train(_cfg(init_dir, shard, tmp_path / "run", steps=4, save_every=2, resume=True))
    out = train(_cfg(init_dir, shard, tmp_path / "fresh", steps=2))
    with pytest.raises(ValueError, match=r"holds a finished run") as info:
        train(_cfg(init_dir, shard, out, steps=2))
    assert "unfinished" not in str(info.value)


@pytest.mark.slow
def test_held_out_loss_is_logged_and_leaves_training_unchanged(init_dir, data, tmp_path):
    """--eval-data: the answer loss of held-out records before training, every N steps and
    at the end (log.jsonl eval_loss), computed without touching the training run."""
    held = make_data(tmp_path / "held", n_fashion=8, n_digits=4, n_text=2, offset=500, name="val.jsonl")
    plain = train(_cfg(init_dir, data, tmp_path / "plain", steps=7))
    out = train(_cfg(init_dir, data, tmp_path / "eval", steps=7, eval_data=[str(held)], eval_every=3))
    rows = _log(out)
    assert [r["loss"] for r in rows if "loss" in r] == [r["loss"] for r in _log(plain)]
    evals = {r["step"]: r["eval_loss"]["val"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 3, 6, 7]
    assert evals[7] < evals[0]  # it learns something that carries to unseen records
    # the number itself: the mean answer NLL of the held-out records under the final model
    from ddfm.train import encode_shard, held_out_loss

    model, proc = load_model(out)
    examples, pixels, _ = encode_shard(str(held), proc, model)
    assert held_out_loss(model, examples, pixels, proc.tokenizer.pad_token_id, "cpu",
                         torch.autocast("cpu", enabled=False)) == pytest.approx(evals[7], rel=1e-5)


def test_half_precision_checkpoint_trains_with_fp32_master_weights(init_dir, data, tmp_path):
    """A bf16 initial checkpoint (as released 7B experts are) is trained in fp32: AdamW's
    updates below bf16's resolution are not lost; --bf16 is the compute dtype, not the storage."""
    from ddfm.model.checkpoint import save_checkpoint

    model, proc = load_model(init_dir)
    half = save_checkpoint(model.to(torch.bfloat16), proc, tmp_path / "bf16-init")
    out = train(_cfg(half, data, tmp_path / "run", steps=2, lr=1e-5))
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    before = load_file(str(half / "model.safetensors"))
    name = next(n for n in weights if "language_model" in n and n.endswith("q_proj.weight"))
    delta = (weights[name] - before[name].float()).abs()
    # lr 1e-5 moves weights far less than bf16's spacing near 0.02 (~1e-4): an fp32 master keeps it
    assert 0 < float(delta.max()) < 1e-3


def test_a_causal_lm_trains_without_train_option(data, tmp_path):
    """`ddfm train --init LM --data D --out O --steps 2 --batch-size 4`: no --train, so the
    causal LM's recipe (its one part, language) trains, and ddfm.json records it."""
    from ddfm.cli import main

    text = tmp_path / "text.jsonl"
    text.write_text("".join(line + "\n" for line in data.read_text().splitlines() if '"image": null' in line))
    lm = init(InitConfig(preset="tiny-lm", data=str(text), out=str(tmp_path / "lm")))
    out = tmp_path / "run"
    assert main(["train", "--init", str(lm), "--data", str(text), "--out", str(out), "--steps", "2",
                 "--batch-size", "4"]) == 0
    meta = json.loads((out / "ddfm.json").read_text())
    assert meta["config"]["train"] == "language" and meta["trainable"]["parts"] == ["language"]
    before, after = load_file(Path(lm) / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith("q_proj.weight"))


def test_a_vlm_without_train_option_trains_its_family_recipe(init_dir, data, tmp_path):
    """tiny-llava without --train: the LLaVA recipe, projector + language model; after one
    step every vision-tower parameter is unchanged and the others moved."""
    out = train(_cfg(init_dir, data, tmp_path / "run", steps=1, warmup=0))
    meta = json.loads((out / "ddfm.json").read_text())
    assert meta["config"]["train"] == "llava" and meta["trainable"]["parts"] == ["projector", "language"]
    before, after = load_file(Path(init_dir) / "model.safetensors"), load_file(out / "model.safetensors")
    vision = [k for k in before if "vision_tower" in k]
    assert vision and all(torch.equal(before[k], after[k]) for k in vision)
    for part in ("multi_modal_projector", "language_model"):
        assert any(not torch.equal(before[k], after[k]) for k in before if part in k), part


def test_every_family_recipe_names_only_parts_it_has():
    """The default of --train follows the model: each family's recipe parses and trains only
    parts that family has; an explicit --train is kept as given."""
    from ddfm.model.families import CAUSAL_LM, FAMILIES
    from ddfm.train import parse_parts, resolve_recipe

    for family in [*FAMILIES.values(), CAUSAL_LM]:
        assert set(parse_parts(family.recipe)) <= set(family.parts), family.name
    assert (FAMILIES["llava"].recipe, FAMILIES["internvl"].recipe, CAUSAL_LM.recipe) == ("llava", "internvl",
                                                                                         "language")
    given = TrainConfig(init="x", data="y", out="z", train="align")
    assert resolve_recipe(given, None) is given and given.parts == ("projector",)
    assert TrainConfig(init="x", data="y", out="z").train is None  # resolved once the model is loaded


def test_lora_trains_low_rank_deltas_of_the_language_model_and_merges_them(init_dir, data, tmp_path):
    """--lora 4: every adapted weight moves by a matrix of rank <= 4, the language model's
    other weights and the frozen tower stay, the projector trains every weight; the result
    is a plain checkpoint (no adapter names) that transformers loads."""
    out = train(_cfg(init_dir, data, tmp_path / "lora", lora=4, lora_alpha=8.0, lr=1e-2))
    rows = _log(out)
    assert rows[-1]["loss"] < rows[0]["loss"]  # it learns
    before = load_file(Path(init_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert after.keys() == before.keys() and not any("lora" in k for k in after)
    targets = [k for k in before if "language_model" in k and k.endswith(("q_proj.weight", "down_proj.weight"))]
    assert targets
    for k in targets:
        delta = (after[k] - before[k]).double()
        assert 0 < torch.linalg.matrix_rank(delta, atol=1e-7).item() <= 4, k
    still = [k for k in before if "language_model" in k and ("norm" in k or "embed_tokens" in k)]
    assert still and all(torch.equal(before[k], after[k]) for k in still)
    assert all(torch.equal(before[k], after[k]) for k in before if "vision_tower" in k)
    assert all(not torch.equal(before[k], after[k]) for k in before if "multi_modal_projector" in k)
    meta = json.loads((out / "ddfm.json").read_text())
    assert meta["trainable"]["parameters"]["lora_adapters"] > 0 and meta["config"]["lora"] == 4
    from transformers import AutoModelForImageTextToText

    assert type(AutoModelForImageTextToText.from_pretrained(out)).__name__ == "LlavaForConditionalGeneration"


@pytest.mark.slow
def test_lora_sigkill_then_resume_is_bitwise_identical(init_dir, data, tmp_path):
    common = ["--init", init_dir, "--data", data, "--steps", 40, "--batch-size", 4, "--lr", 3e-3,
              "--save-every", 5, "--seed", 7, "--lora", 4]
    _reference_then_killed(common, tmp_path, 13)
    resumed = _ddfm(*common, "--out", tmp_path / "run", "--resume")
    assert resumed.wait() == 0, resumed.stdout.read()
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "run" / "ddfm.json").read_text())["compute"]["resumes"] == 1


def test_lora_option_errors_name_the_problem(init_dir, data, tmp_path):
    with pytest.raises(ValueError, match="--lora must be >= 0"):
        _cfg(init_dir, data, tmp_path / "x", lora=-1)
    with pytest.raises(ValueError, match="does not train it"):
        _cfg(init_dir, data, tmp_path / "x", lora=4, train="align")
    with pytest.raises(ValueError, match="--fsdp"):
        _cfg(init_dir, data, tmp_path / "x", lora=4, fsdp=True)
    with pytest.raises(ValueError, match="no linear layer of the language model"):
        train(_cfg(init_dir, data, tmp_path / "y", lora=4, lora_targets=["nope_proj"], steps=1))


def test_loss_on_all_labels_every_token_but_the_image_placeholders(init_dir, data):
    from ddfm.model.checkpoint import load_model
    from ddfm.train.data import IGNORE, encode_shard

    model, processor = load_model(init_dir)
    answers, _, _ = encode_shard(str(data), processor, model)
    every, _, _ = encode_shard(str(data), processor, model, loss_on="all")
    image_id = model.config.image_token_id
    for a, e in zip(answers, every):
        assert a.input_ids == e.input_ids
        # every answer token stays in the loss, and so does every other token but the image's
        assert all(le == t for la, le, t in zip(a.labels, e.labels, e.input_ids) if la != IGNORE)
        assert [t for t, le in zip(e.input_ids, e.labels) if le == IGNORE] == [t for t in e.input_ids
                                                                              if t == image_id]
        assert e.n_loss > a.n_loss
    with pytest.raises(ValueError, match="--loss-on"):
        _cfg(init_dir, data, "/tmp/x", loss_on="questions")
