"""`ddfm ablate`: the rows of the paper's ablation tables, and --quick end to end (slow)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from ddfm.ablate import ABLATIONS, AblateConfig, ablate, variants
from ddfm.demo import resolve_preset


def test_variants_change_one_setting_of_the_baseline():
    preset = resolve_preset("image")
    rows = variants(preset, list(ABLATIONS))
    assert len(rows) == sum(len(v) for v in ABLATIONS.values())
    base = {"encoder": preset["encoder"], "k": preset["k"], "algorithm": preset["algorithm"], "routing": "top-1"}
    field = {"K": "k", "encoder": "encoder", "clustering": "algorithm", "routing": "routing"}
    for group, setting in rows:  # a row moves only its group's setting ...
        assert {k for k in base if setting[k] != base[k]} <= {field[group]}, (group, setting)
    for group, entries in ABLATIONS.items():  # ... to each of the group's values, the baseline's among them once
        values = [s[field[group]] for g, s in rows if g == group]
        assert values == [e[field[group]] for e in entries] and len(set(values)) == len(values), group
        assert values.count(base[field[group]]) == 1, group
    assert ("K", {**base, "k": 4}) in rows
    assert ("encoder", {**base, "encoder": "tower"}) in rows
    with pytest.raises(ValueError, match="groups"):
        AblateConfig(groups=["nope"])


@pytest.mark.slow
def test_ablate_quick_end_to_end(tmp_path):
    report = ablate(AblateConfig(out=str(tmp_path / "run"), quick=True))
    text = report.read_text()
    for label in ("K=4", "| encoder | tower |", "| encoder | pixels |", "two-stage", "| routing | posterior |"):
        assert label in text, label
    data = json.loads((tmp_path / "run" / "ablate" / "ablate.json").read_text())
    assert len(data["rows"]) == sum(len(v) for v in ABLATIONS.values())
    # K=4 trained four compute-matched experts at a quarter of the dense batch
    k4 = tmp_path / "run" / "ablate" / "pixels-k4-balanced"
    dense = json.loads((tmp_path / "run" / "dense" / "ddfm.json").read_text())["compute"]
    for j in range(4):
        c = json.loads((k4 / f"expert-{j}" / "ddfm.json").read_text())["compute"]
        assert c["steps"] == dense["steps"] and 4 * c["batch_size"] == dense["batch_size"]
    with Image.open(tmp_path / "run" / "ablate" / "ablate.png") as im:
        im.verify()


def test_seed_summary_spreads_the_overall_and_every_task_row():
    from ddfm.ablate import seed_summary, seeds_markdown

    def ev(overall, tasks):  # the fields of eval.json the summary reads
        return {"overall": {"accuracy": overall}, "by_task": {t: {"accuracy": a} for t, a in tasks.items()}}

    evals = {0: {"dense": ev(0.5, {"a": 0.4, "b": 0.6}), "top-1": ev(0.6, {"a": 0.5, "b": 0.7})},
             1: {"dense": ev(0.7, {"a": 0.6, "b": 0.8}), "top-1": ev(0.6, {"a": 0.7, "b": None})},
             2: {"dense": ev(0.6, {"a": 0.8, "b": 0.7}), "top-1": ev(0.9, {"a": 0.6, "b": 0.5})}}
    s = seed_summary(evals)
    assert s["runs"]["1"] == {"dense": 0.7, "top-1": 0.6}
    assert s["summary"]["dense"]["mean"] == pytest.approx(0.6) and s["summary"]["dense"]["sd"] == pytest.approx(0.1)
    top1 = s["summary"]["top-1"]
    assert top1["mean"] == pytest.approx(0.7) and top1["sd"] == pytest.approx(0.17320508)
    # the gap is Δ = routing − dense per seed (+0.1, −0.1, +0.3), then its mean and sd
    assert top1["gap_mean"] == pytest.approx(0.1) and top1["gap_sd"] == pytest.approx(0.2)
    a, b = s["task_summary"]["a"], s["task_summary"]["b"]
    assert a["dense"]["mean"] == pytest.approx(0.6) and a["top-1"]["mean"] == pytest.approx(0.6)
    # a seed without the task's accuracy is left out of that task's mean and gap only
    assert b["top-1"]["mean"] == pytest.approx(0.6) and b["top-1"]["gap_mean"] == pytest.approx(-0.05)
    text = "\n".join(seeds_markdown(s))
    assert "| mean ± sd | 60.0 ± 10.0 | 70.0 ± 17.3 |" in text
    assert "| Δ (− dense) | – | +10.0 ± 20.0 |" in text
    assert "| a | 60.0 ± 20.0 | 60.0 ± 10.0 |" in text


@pytest.mark.slow
def test_the_loss_study_retrains_the_experts_on_every_token(tmp_path):
    report = ablate(AblateConfig(out=str(tmp_path / "run"), quick=True, groups=["loss"]))
    assert "## The exact posterior router on experts that model the whole conversation" in report.read_text()
    studies = json.loads((tmp_path / "run" / "ablate" / "studies.json").read_text())["loss"]
    for j, name in enumerate(studies["experts"]["all"]):
        meta = json.loads((tmp_path / "run" / name / "ddfm.json").read_text())
        assert meta["config"]["loss_on"] == "all" and meta["cluster"] == j
        demo = json.loads((tmp_path / "run" / studies["experts"]["answers"][j] / "ddfm.json").read_text())
        assert demo["config"]["loss_on"] == "answers"
        assert meta["compute"]["steps"] == demo["compute"]["steps"]  # the same compute
        assert meta["compute"]["loss_tokens_seen"] > demo["compute"]["loss_tokens_seen"]
    top1 = json.loads((tmp_path / "run" / "eval-top-1" / "eval.json").read_text())["overall"]["accuracy"]
    assert studies["rows"]["answers"]["top-1"]["accuracy"] == top1


def test_loss_markdown_puts_the_posterior_gap_last():
    from ddfm.ablate import loss_markdown

    res = {"dense": {"accuracy": 0.5, "perplexity": 2.0},
           "rows": {"answers": {"top-1": {"accuracy": 0.6, "perplexity": 1.5},
                                "posterior": {"accuracy": 0.4, "perplexity": 3.0}},
                    "all": {"top-1": {"accuracy": 0.55, "perplexity": 1.6},
                            "posterior": {"accuracy": 0.58, "perplexity": 1.7}}}}
    text = "\n".join(loss_markdown(res))
    assert "| answers | 60.0 (1.500) | 40.0 (3.000) | -20.0 |" in text
    assert "| all | 55.0 (1.600) | 58.0 (1.700) | +3.0 |" in text
    assert "(50.0 %, perplexity 2.000)" in text
