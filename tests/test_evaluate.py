"""ddfm.evaluate: VQA normalisation, aggregation, chance levels, and `ddfm eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ddfm.data import Record
from ddfm.evaluate import aggregate, chance_levels, exact_match, markdown_report, normalize_answer


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),
    ("  The sneaker. ", "sneaker"),
    ("an ankle boot", "ankle boot"),
    ("Three", "3"),
    ("two dogs!", "2 dogs"),
    ("t-shirt", "t shirt"),         # VQA: a mark not next to a space becomes a space
    ("dont", "don't"),
    ("3.5", "3.5"),                 # a period inside a number stays
    ("1,000", "1000"),
    ("a\tthick  handwritten\nthree", "thick handwritten 3"),
])
def test_normalize_answer_vqa(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_uses_normalisation():
    assert exact_match("The Sneaker.", "sneaker")
    assert exact_match("seven", "7")
    assert exact_match("a pair of trousers", "pair of trousers")
    assert not exact_match("sneaker", "sandal")
    assert not exact_match("", "yes")


def test_aggregate_accuracy_and_token_weighted_perplexity():
    rows = [
        {"task": "a", "source": "s1", "cluster": "0", "correct": True, "nll": 2.0, "n_tokens": 2},
        {"task": "a", "source": "s1", "cluster": "1", "correct": False, "nll": 4.0, "n_tokens": 2},
        {"task": "b", "source": "s2", "cluster": "1", "correct": None, "nll": 6.0, "n_tokens": 6},  # text record
    ]
    overall = aggregate(rows)
    assert overall["n"] == 3 and overall["n_qa"] == 2
    assert overall["accuracy"] == pytest.approx(0.5)
    assert overall["perplexity"] == pytest.approx(math.exp(12.0 / 10))
    by_task = aggregate(rows, "task")
    assert by_task["a"]["accuracy"] == pytest.approx(0.5)
    assert by_task["a"]["perplexity"] == pytest.approx(math.exp(6.0 / 4))
    assert by_task["b"]["accuracy"] is None and by_task["b"]["perplexity"] == pytest.approx(math.e)
    by_cluster = aggregate(rows, "cluster")
    assert by_cluster["1"]["n"] == 2 and by_cluster["1"]["accuracy"] == 0.0
    assert set(aggregate(rows, "source")) == {"s1", "s2"}


def _rec(i, task, answer, image="x.png"):
    return Record(id=str(i), image=image, conversations=[{"from": "human", "value": "<image>\nQ?"},
                                                         {"from": "gpt", "value": answer}],
                  extra={"task": task, "source": "src"})


def test_chance_levels_from_test_answers_and_prepare_json(tmp_path):
    recs = [_rec(0, "t", "yes"), _rec(1, "t", "Yes."), _rec(2, "t", "no"), _rec(3, "u", "a")]
    assert chance_levels(recs) == {"t": pytest.approx(2 / 3), "u": 1.0}
    assert chance_levels(recs, tmp_path / "missing.json")["t"] == pytest.approx(2 / 3)
    (tmp_path / "prepare.json").write_text(json.dumps({"tasks": {"t": {"chance_majority": 0.25},
                                                                  "docs": {"kind": "text"}}}))
    assert chance_levels(recs, tmp_path / "prepare.json") == {"t": 0.25}


def test_markdown_report_lists_every_group():
    rows = [{"task": "a", "source": "s", "cluster": "0", "correct": True, "nll": 1.0, "n_tokens": 1}]
    result = {"overall": aggregate(rows), "by_task": aggregate(rows, "task"), "by_source": aggregate(rows, "source"),
              "by_cluster": aggregate(rows, "cluster"), "chance": {"a": 0.5}, "n_records": 1, "elapsed_s": 0.1}
    md = markdown_report(result, "T")
    assert "| a | 100.0 | 50.0 | 2.718 | 1 |" in md
    assert "| all | 100.0 | 2.718 | 1 |" in md


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real tiny-llava checkpoint trained a few steps on real images, and a test file."""
    from test_models import make_data

    from ddfm.models import InitConfig, init
    from ddfm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("eval")
    data = make_data(root / "train", n_fashion=16, n_digits=8, n_text=4)
    test = make_data(root / "test", n_fashion=6, n_digits=4, n_text=2, offset=100, name="test.jsonl")
    base = init(InitConfig(preset="tiny-llava", data=str(data), out=str(root / "init")))
    model = train(TrainConfig(init=str(base), data=str(data), out=str(root / "model"), steps=3, batch_size=4,
                              save_every=0, device="cpu"))
    return {"root": root, "test": test, "model": model}


def test_ddfm_eval_end_to_end_single_model_and_ensemble(tiny_run, capsys):
    from ddfm.cli import main

    out = tiny_run["root"] / "out-single"
    assert main(["eval", str(tiny_run["test"]), "--experts", str(tiny_run["model"]), "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_records"] == 12
    assert set(result["by_task"]) == {"name", "digit", "sum"}
    assert set(result["by_source"]) == {"fashion-mnist", "digits", "arithmetic"}
    assert result["by_task"]["sum"]["accuracy"] is None            # text-only: perplexity only
    assert result["by_task"]["sum"]["perplexity"] > 1.0
    assert 0.0 <= result["by_task"]["name"]["accuracy"] <= 1.0
    # chance from the test answers (no prepare.json beside this test file)
    assert 0 < result["chance"]["name"] <= 1
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 12 and all(p["n_tokens"] > 0 and p["nll"] > 0 for p in preds)
    assert all((p["prediction"] is None) == (p["task"] == "sum") for p in preds)
    assert "| name |" in (out / "eval.md").read_text()

    # an ensemble of two copies of the model mixes identical distributions: same NLL
    out2 = tiny_run["root"] / "out-pair"
    assert main(["eval", str(tiny_run["test"]), "--experts", str(tiny_run["model"]), str(tiny_run["model"]),
                 "--mode", "uniform", "--out", str(out2), "--batch-size", "4", "--max-new-tokens", "4"]) == 0
    pair = json.loads((out2 / "eval.json").read_text())
    assert pair["overall"]["perplexity"] == pytest.approx(result["overall"]["perplexity"], rel=1e-4)
    assert pair["overall"]["accuracy"] == pytest.approx(result["overall"]["accuracy"])


def test_ddfm_eval_bad_input(tiny_run, tmp_path, capsys):
    from ddfm.cli import main

    assert main(["eval", str(tmp_path / "nope.jsonl"), "--experts", str(tiny_run["model"])]) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    assert main(["eval", str(tiny_run["test"]), "--experts", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    assert main(["eval", str(tiny_run["test"]), "--experts", "a", "b"]) == 2
    assert "--router" in capsys.readouterr().err


def test_ddfm_eval_skips_and_reports_records_whose_image_failed(tiny_run, tmp_path):
    """A truncated PNG shared by two records and a missing file: eval does not crash; the
    three records are left out of every figure and listed in eval.json and eval.md."""
    from ddfm.cli import main

    test = tiny_run["test"]
    rows = [json.loads(line) for line in test.read_text().splitlines()]
    for r in rows:
        if r["image"]:
            r["image"] = str(test.parent / r["image"])
    real = Path(rows[0]["image"]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(real[: len(real) // 2])
    bad = [{**rows[0], "id": "cut-a", "image": str(tmp_path / "truncated.png")},
           {**rows[1], "id": "cut-b", "image": str(tmp_path / "truncated.png")},
           {**rows[2], "id": "lost", "image": str(tmp_path / "gone.png")}]
    path = tmp_path / "test.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + bad + rows[2:]))
    out = tmp_path / "out"
    assert main(["eval", str(path), "--experts", str(tiny_run["model"]), "--out", str(out),
                 "--batch-size", "4", "--max-new-tokens", "2"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["n_records"] == len(rows) == result["overall"]["n"]
    skipped = result["skipped_images"]
    assert skipped["count"] == 3
    assert [(s["id"], s["line"]) for s in skipped["records"]] == [("cut-a", 3), ("cut-b", 4), ("lost", 5)]
    assert "truncated" in skipped["records"][0]["reason"]
    assert skipped["records"][2]["reason"].startswith("image file not found")
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {p["id"] for p in preds} == {r["id"] for r in rows}
    assert "3 record(s) skipped: their image failed" in (out / "eval.md").read_text()
