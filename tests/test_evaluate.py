"""ddfm.evaluate: VQA normalisation, aggregation, chance levels, and `ddfm eval` end to end."""

from __future__ import annotations

import json
import math

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
