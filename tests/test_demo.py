"""`ddfm demo --quick`: the whole pipeline end to end in a temp dir, REPORT.md, plots,
resume (finished stages skipped, markers unchanged) and same seed -> same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ddfm.demo import PRESETS, QUICK, DemoConfig, demo, resolve_preset

STAGES = ["data", "init", "pretrain", "align", "embed", "partition", "partition-val", "dense", "expert-0",
          "expert-1", "eval-dense", "eval-top-1", "eval-soft", "eval-posterior", "eval-posterior-answers"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    report = demo(DemoConfig(out=str(out), quick=True))
    return out, report


def _markers(out: Path) -> dict[str, str]:
    return {s: (out / s / "DONE.json").read_text() for s in STAGES}


def _flat(x, path: str = "") -> dict:
    """A JSON value as {"a/b/0": leaf}, for comparisons with a tolerance."""
    if isinstance(x, dict):
        return {k: v for key, value in x.items() for k, v in _flat(value, f"{path}/{key}").items()}
    if isinstance(x, list):
        return {k: v for i, value in enumerate(x) for k, v in _flat(value, f"{path}[{i}]").items()}
    return {path: x}


def _numbers(out: Path) -> dict:
    return {k: v for s in STAGES if s.startswith("eval-")
            for k, v in _flat({key: value for key, value in json.loads((out / s / "eval.json").read_text()).items()
                               if key not in ("elapsed_s", "provenance")}, s).items()}


def _answers(out: Path) -> dict[str, list]:
    """Every eval stage's generated answers, record by record."""
    return {s: [(r["id"], r["prediction"]) for r in map(json.loads, (out / s / "predictions.jsonl").open())]
            for s in STAGES if s.startswith("eval-")}


def _main_table(out: Path) -> str:
    return (out / "REPORT.md").read_text().split("## ", 2)[1]


@pytest.mark.slow
def test_demo_quick_writes_report_tables_and_plots(quick_run, capsys):
    out, report = quick_run
    assert report == out / "REPORT.md"
    text = report.read_text()
    assert ("| task | chance | dense | top-1 | soft | posterior | posterior-answers | Δ top-1 | Δ soft | "
            "Δ posterior | Δ posterior-answers |") in text
    assert "## Compute of every run" in text and "| experts (sum of 2) |" in text
    # each run is named as the paper's stage it stands for
    compute = text.split("## Compute of every run")[1].split("##")[0]
    for run, stage in [("pretrain", "LLM pretraining"), ("align", "vision-language alignment"),
                       ("dense", "centralised: the dense baseline"), ("expert-1", "expert-1 on cluster 1 only")]:
        assert any(line.startswith(f"| {run} |") and stage in line for line in compute.splitlines()), (run, compute)
    assert "## Partition" in text and "efficientnet" not in text.split("## Partition")[1][:40]  # quick: pixels
    for stage in STAGES:
        assert (out / stage / "DONE.json").is_file(), stage
    # what produced the numbers: the commit, the versions, the CPU and its vector extensions
    prov = text.split("## Provenance")[1]
    assert "- commit: " in prov and "torch " in prov and "transformers " in prov and "- CPU: " in prov
    meta = json.loads((out / "eval-top-1" / "eval.json").read_text())["provenance"]
    assert {"commit", "dirty", "versions", "cpu", "threads", "date"} <= set(meta)
    assert {"torch", "transformers", "numpy", "numba", "ddfm"} <= set(meta["versions"])
    for png in ("partition.png", "loss.png", "tasks.png", "held_out.png"):
        with Image.open(out / png) as im:
            im.verify()
            assert im.format == "PNG"
        assert f"]({png})" in text
    result = json.loads((out / "eval-dense" / "eval.json").read_text())
    tasks = set(result["by_task"])
    assert any(t.startswith("fmnist") for t in tasks) and any(t.startswith("digits") for t in tasks)
    for t, g in result["by_task"].items():  # every QA task of the report has its chance level beside it
        if g["accuracy"] is not None:
            assert t in result["chance"] and f"| {t} | {100 * result['chance'][t]:.1f} |" in text
    # the compute-matched experts: same steps as dense, half its batch
    dense = json.loads((out / "dense" / "ddfm.json").read_text())["compute"]
    expert = json.loads((out / "expert-0" / "ddfm.json").read_text())["compute"]
    assert expert["steps"] == dense["steps"] and 2 * expert["batch_size"] == dense["batch_size"]
    # the paper's regime: the base is pretrained on text, then aligned on captions; the dense
    # baseline makes its preset's passes over the training records
    pretrain = json.loads((out / "pretrain" / "ddfm.json").read_text())
    align = json.loads((out / "align" / "ddfm.json").read_text())
    assert pretrain["config"]["train"] == "language" and align["config"]["train"] == "internvl"
    assert align["init"].endswith("pretrain")
    epochs, batch = resolve_preset("image", quick=True)["dense"]["epochs"], dense["batch_size"]
    assert epochs <= dense["epochs"] < epochs + batch / (dense["samples_seen"] / dense["epochs"])


def _predictions(out: Path, routing: str) -> list[dict]:
    return [json.loads(line) for line in (out / f"eval-{routing}" / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_demo_report_explains_the_gap(quick_run):
    """The gap's diagnostics in REPORT.md: dense vs the routed expert per cluster, the
    router-only baseline, routes leaving the feature cluster, held-out curves."""
    out, report = quick_run
    text = report.read_text()
    assert "## Where the gap comes from" in text and "**Router only**" in text
    for routing in ("top-1", "posterior-answers"):
        assert f"| {routing} |" in text.split("**Routes that leave")[1]
    # the router-only figures are what its definition gives, recomputed here
    from ddfm.report import router_only_baseline

    preds = [json.loads(line) for line in (out / "eval-dense" / "predictions.jsonl").read_text().splitlines()]
    base = router_only_baseline([out / "partition" / f"shard-{k:02d}.jsonl" for k in range(2)], preds)
    row = next(line for line in text.splitlines() if line.startswith("| **overall** |") and "router" not in line
               and text.index(line) > text.index("**Router only**"))
    assert f"| {100 * base['overall']:.1f} |" in row
    # the columns-that-agree table: answers that differ, recomputed from the predictions
    from ddfm.report import answers_that_differ

    soft, top1 = (_predictions(out, n) for n in ("soft", "top-1"))
    agree = text.split("**Columns that agree**")[1]
    row = next(line for line in agree.splitlines() if line.startswith("| soft |"))
    assert row.split(" | ")[1] == str(answers_that_differ(soft, top1)) and row.split(" | ")[2] == "–"
    logs = [json.loads(line) for line in (out / "expert-1" / "log.jsonl").read_text().splitlines()]
    assert [r for r in logs if "eval_loss" in r][0]["eval_loss"].keys() == {"cluster-1"}


@pytest.mark.slow
def test_demo_resume_skips_finished_stages(quick_run):
    out, _ = quick_run
    before, numbers = _markers(out), _numbers(out)
    demo(DemoConfig(out=str(out), quick=True))  # nothing to do
    assert _markers(out) == before
    # an interrupted stage (no marker, partial files) is redone; the others are not
    (out / "eval-soft" / "DONE.json").unlink()
    (out / "eval-soft" / "partial.tmp").write_text("half-written")
    demo(DemoConfig(out=str(out), quick=True))
    after = _markers(out)
    assert {s for s in STAGES if after[s] != before[s]} == {"eval-soft"}
    assert not (out / "eval-soft" / "partial.tmp").exists()
    assert _numbers(out) == numbers


@pytest.mark.slow
def test_demo_same_seed_same_numbers(quick_run, tmp_path):
    """The same command, environment and thread count on the same machine: the same answers,
    the same numbers and the same printed table (docs/demo.md, "What is reproducible")."""
    out, _ = quick_run
    demo(DemoConfig(out=str(tmp_path / "again"), quick=True))
    assert _answers(tmp_path / "again") == _answers(out)
    assert _main_table(tmp_path / "again") == _main_table(out)
    # training's float32 sums may differ in the last bits between two runs in one process
    # (oneDNN and the BLAS pick their vector path by buffer alignment): the numbers agree to
    # ~1e-7 relative, far below the digits any table prints
    again, first = _numbers(tmp_path / "again"), _numbers(out)
    assert again.keys() == first.keys()
    floats = [k for k, v in first.items() if isinstance(v, float)]
    assert {k: v for k, v in again.items() if k not in floats} == {k: v for k, v in first.items() if k not in floats}
    assert [again[k] for k in floats] == pytest.approx([first[k] for k in floats], rel=1e-6)


@pytest.mark.slow
def test_demo_text_preset_quick(tmp_path):
    report = demo(DemoConfig(out=str(tmp_path / "text"), preset="text", quick=True))
    text = report.read_text()
    assert "Perplexity of the reference text" in text
    result = json.loads((tmp_path / "text" / "eval-top-1" / "eval.json").read_text())
    assert result["overall"]["accuracy"] is None and result["overall"]["perplexity"] > 1


def test_presets_are_data_and_validated():
    assert set(QUICK) == set(PRESETS)
    q = resolve_preset("image", quick=True)
    assert q["prepare"]["train_size"] < PRESETS["image"]["prepare"]["train_size"]
    assert q["dense"]["train"] == PRESETS["image"]["dense"]["train"]  # merged, not replaced
    with pytest.raises(ValueError, match="preset"):
        DemoConfig(preset="nope")


def _documented_formats() -> dict[str, list[tuple[str, list[str]]]]:
    """docs/ARCHITECTURE.md's file formats: {demo directory: [(file, documented JSON keys)]}."""
    import re

    text = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## File formats")[1]
    formats: dict[str, list[tuple[str, list[str]]]] = {}
    for block in re.split(r"\n(?=\*\*)", section):
        where = re.search(r"demo: `([\w.-]+)/`\)", block.split("\n\n")[0])
        if not where:
            continue
        files = formats.setdefault(where.group(1), [])
        for bullet in re.split(r"\n\* ", "\n" + block.split("\n", 1)[1])[1:]:
            names = re.findall(r"`([\w./-]+\.\w+|images)`(?:, | —)", bullet.split(" — ")[0] + " —")
            keys = re.search(r"`\{([^}]*)\}`", bullet)
            for name in names:
                files.append((name, re.findall(r'"(\w+)"', keys.group(1)) if keys and name == names[-1] else []))
    return formats


@pytest.mark.slow
def test_architecture_doc_matches_a_demo_run(quick_run):
    """Every file ARCHITECTURE.md lists for a stage directory exists in a real run, with the
    JSON keys it documents (a JSON file's top level, a JSON Lines file's longest row)."""
    out, _ = quick_run
    formats = _documented_formats()
    assert set(formats) == {"data", "embed", "partition", "expert-0", "eval-dense"}, formats
    for directory, files in formats.items():
        assert len(files) >= 3, (directory, files)
        for name, keys in files:
            path = out / directory / name
            assert path.exists(), f"ARCHITECTURE.md lists {directory}/{name}, the demo run has no such file"
            if keys:
                text = path.read_text(encoding="utf-8")
                rows = [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]
                row = max(rows, key=len)
                missing = set(keys) - set(row)
                assert not missing, f"{directory}/{name} lacks the documented keys {sorted(missing)}"
    for stage in STAGES:  # the demo run directory: one DONE.json marker per stage, with its key
        assert {"stage", "key", "config"} <= set(json.loads((out / stage / "DONE.json").read_text()))


@pytest.mark.slow
def test_demo_pretrained_preset_quick(tmp_path):
    """The pretrained preset end to end at toy sizes: the base has DINOv2-small's and
    SmolLM2's weights, alignment trains the projector only, the dense run and the experts
    learn through LoRA (merged: plain checkpoints), every routing is evaluated."""
    import torch
    from safetensors.torch import load_file

    report = demo(DemoConfig(out=str(tmp_path / "p"), preset="pretrained", quick=True))
    text = report.read_text()
    assert "preset pretrained" in text and "posterior-answers" in text
    root = tmp_path / "p"
    init, align = load_file(root / "init" / "model.safetensors"), load_file(root / "align" / "model.safetensors")
    changed = {k for k in init if not torch.equal(init[k], align[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)  # LLaVA's stage 1
    assert any("vision_tower" in k and ".encoder.layer." in k for k in init)  # DINOv2's names (CLIP's: .layers.)
    for run in ("dense", "expert-0", "expert-1"):
        meta = json.loads((root / run / "ddfm.json").read_text())
        assert meta["config"]["lora"] == 16 and meta["trainable"]["parameters"]["lora_adapters"] > 0
        assert not any("lora" in k for k in load_file(root / run / "model.safetensors"))
