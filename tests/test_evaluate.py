"""ddfm.evaluate: VQA normalisation, aggregation, chance levels, and `ddfm eval` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers.data import make_data

from ddfm.data import Record
from ddfm.evaluate import aggregate, chance_levels, exact_match, markdown_report, normalize_answer


@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"),
    ("  The sneaker. ", "sneaker"),
    ("the dog.", "dog"),
    ("an ankle boot", "ankle boot"),
    ("Three", "3"),
    ("ten", "10"),
    ("None", "0"),
    ("two dogs!", "2 dogs"),
    ("t-shirt", "t shirt"),         # VQA: a mark not next to a space becomes a space
    ("t - shirt", "t shirt"),       # ... and one next to a space vanishes
    ("1,000 t-shirts", "1000 tshirts"),  # a digit comma anywhere: every mark vanishes
    ("dont", "don't"),
    ("3.5", "3.5"),                 # a period inside a number stays
    ("5.", "5"),
    ("a\tthick  handwritten\nthree", "thick handwritten 3"),
    # contractions the official table has and a 33-entry one lacked
    ("youll", "you'll"), ("whatll", "what'll"), ("maam", "ma'am"), ("oclock", "o'clock"),
    ("yall", "y'all"), ("twas", "'twas"), ("shouldnt've", "shouldn't've"), ("somebody'd", "somebodyd"),
    # the official table's capitalised keys never match after lowercasing: "Im" stays "im"
    ("Im", "im"), ("Ive", "ive"),
    ("colon: kept", "colon: kept"),  # ':' and "'" are not in the official punct list
    ("." * 40, "." * 8),            # periodStrip.sub("", t, re.UNICODE): the flag is sub's count, 32
])
def test_normalize_answer_is_the_official_vqa_processing(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_tables_are_the_official_ones():
    from ddfm import vqa

    assert len(vqa._CONTRACTIONS) == 120     # every entry of vqaEval.py's contractions (a013f00)
    assert vqa._CONTRACTIONS["dont"] == "don't" and vqa._CONTRACTIONS["Id've"] == "I'd've"
    assert list(vqa._MANUAL_MAP.items())[-1] == ("ten", "10") and vqa._ARTICLES == ["a", "an", "the"]
    assert "." not in vqa._PUNCT and "'" not in vqa._PUNCT and len(vqa._PUNCT) == 21


@pytest.mark.parametrize("prediction, answers, expected", [
    # leave-one-out over 10 humans: min(1, #other humans that gave the prediction / 3), averaged
    ("2", ["2"] * 3 + ["3"] * 7, 0.9),          # 3 humans: (7 * 1 + 3 * 2/3) / 10
    ("2", ["2"] + ["3"] * 9, 0.3),              # 1 human: (9 * 1/3 + 1 * 0) / 10
    ("two", ["2"] * 2 + ["3"] * 8, 0.6),        # the humans disagree: both sides normalised ("two" -> "2")
    # a unanimous panel is compared as written: no normalisation of either side
    ("Yes", ["yes"] * 10, 0.0),
    ("yes", ["yes"] * 10, 1.0),
    ("Yes", ["yes"] * 9 + ["Yes"], 1.0),        # one differing human turns the normalisation on
    # references get processDigitArticle too (the pre-2021 script gave them punctuation only: 0.6)
    ("two dogs", ["Two dogs"] * 8 + ["2 dogs"] * 2, 1.0),
    ("no", ["yes", "no"], 1 / 6),               # two humans: (1/3 + 0) / 2
])
def test_vqa_accuracy_follows_the_official_evaluate(prediction, answers, expected):
    from ddfm.evaluate import vqa_accuracy

    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_one_reference_is_exact_match_after_normalisation():
    from ddfm.evaluate import vqa_accuracy

    cases = [("The Sneaker.", "sneaker"), ("seven", "7"), ("Dont", "don't"), ("sneaker", "sandal"), ("", "yes")]
    for p, r in cases:  # a single reference = a panel that agrees on it, both sides normalised
        assert exact_match(p, r) == (vqa_accuracy(normalize_answer(p), [normalize_answer(r)] * 10) == 1.0)
    with pytest.raises(ValueError, match="no reference answers"):
        vqa_accuracy("yes", [])


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


def _text(i, question, answer, **extra):
    return Record(id=str(i), conversations=[{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
                  extra=extra)


@pytest.fixture(scope="module")
def docs_passages(python_docs):
    """Real text: test passages of the Python docs as ``ddfm prepare python-docs`` cuts them."""
    return python_docs[1]


def test_chance_comes_only_from_prepare_json(tmp_path):
    recs = [_rec(0, "t", "yes"), _rec(1, "t", "Yes."), _rec(2, "t", "no"), _rec(3, "u", "a")]
    assert chance_levels(recs) == {}                                # no train split: no chance level
    assert chance_levels(recs, tmp_path / "missing.json") == {}
    # the train split's majority answer, scored like a prediction on the records evaluated
    # (prepare.json's chance_majority is over its whole test split, compared unnormalised)
    (tmp_path / "prepare.json").write_text(json.dumps({"tasks": {
        "t": {"majority_answer": "yes", "chance_majority": 0.25}, "docs": {"kind": "text"}}}))
    assert chance_levels(recs, tmp_path / "prepare.json") == {"t": pytest.approx(2 / 3)}
    assert chance_levels(recs[2:], tmp_path / "prepare.json") == {"t": 0.0}   # e.g. under --limit


def test_oracle_chance_is_the_best_constant_answer_and_labelled_so():
    from ddfm.evaluate import oracle_chance_levels

    recs = [_rec(0, "t", "yes"), _rec(1, "t", "Yes."), _rec(2, "t", "no"), _rec(3, "u", "a"),
            _text(4, "Explain the with statement.", "The with statement wraps a block in the methods of a context "
                  "manager, so that setup and teardown always run.", task="docs")]
    assert oracle_chance_levels(recs) == {"t": pytest.approx(2 / 3), "u": 1.0}  # no level for the passage task
    assert oracle_chance_levels(recs, skip={"t"}) == {"u": 1.0}
    rows = [{"task": "t", "source": "s", "cluster": "0", "correct": True, "nll": 1.0, "n_tokens": 1}]
    result = {"overall": aggregate(rows), "by_task": aggregate(rows, "task"), "by_source": aggregate(rows, "source"),
              "by_cluster": aggregate(rows, "cluster"), "chance": {}, "chance_oracle": {"t": 2 / 3},
              "n_records": 1, "elapsed_s": 0.1}
    md = markdown_report(result, "T")
    assert "| task | accuracy % | oracle chance % | perplexity | records |" in md
    assert "| t | 100.0 | 66.7 (oracle) | 2.718 | 1 |" in md
    assert "read off the test answers (an oracle)" in md


def test_short_answers_are_question_answer_text_or_image(docs_passages):
    from ddfm.evaluate import QA_MAX_WORDS, is_qa

    arithmetic = [_text(i, f"What is {a}+{b}?", str(a + b)) for i, (a, b) in enumerate([(12, 7), (3, 40), (9, 9)])]
    assert all(is_qa(r) for r in arithmetic)                        # text-only short answers get accuracy
    assert is_qa(_rec(0, "caption", "a thick handwritten three"))   # the demo's longest answers: 4 words
    assert not any(is_qa(r) for r in docs_passages)                 # passages: perplexity only
    assert min(len(r.answer().split()) for r in docs_passages) > QA_MAX_WORDS
    assert not is_qa(arithmetic[0], max_words=0)                    # the threshold is an option


def test_source_and_task_fall_back_when_absent(tmp_path, docs_passages):
    from ddfm.data import load_records

    (tmp_path / "fabric").mkdir()
    (tmp_path / "fabric" / "0.png").write_bytes(b"")   # existence is all the loader checks
    passage = docs_passages[0].answer()
    rows = [{"id": "img", "image": "fabric/0.png", "conversations": [{"from": "human", "value": "Defect?"},
                                                                     {"from": "gpt", "value": "a hole"}]},
            {"id": "sum", "image": None, "conversations": [{"from": "human", "value": "What is 12+7?"},
                                                           {"from": "gpt", "value": "19"}]},
            {"id": "doc", "image": None, "conversations": [{"from": "human", "value": "Explain bool."},
                                                           {"from": "gpt", "value": passage}]},
            {"id": "nul", "image": None, "source": None, "task": None,
             "conversations": [{"from": "human", "value": "What is 12+7?"}, {"from": "gpt", "value": "19"}]},
            {"id": "own", "image": None, "source": "my-notes", "task": "recall",
             "conversations": [{"from": "human", "value": "Explain bool."}, {"from": "gpt", "value": passage}]}]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs = {r.id: r for r in load_records(tmp_path / "d.jsonl").records}
    ids = ("img", "sum", "doc", "nul", "own")
    assert [recs[i].source for i in ids] == ["fabric", "text", "text", "text", "my-notes"]
    assert [recs[i].task for i in ids] == ["qa", "qa", "long-answer", "qa", "recall"]


# ------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, python_docs):
    """A real tiny-llava checkpoint trained a few steps on real images, and a test file."""
    from ddfm.init import InitConfig, init
    from ddfm.train import TrainConfig, train

    root = tmp_path_factory.mktemp("eval")
    data = make_data(root / "train", n_fashion=16, n_digits=8, n_text=4)
    test = make_data(root / "test", n_fashion=6, n_digits=4, n_text=2, offset=100, name="test.jsonl")
    # real text passages (with prepare's source/task) and a user's records without source/task:
    # text arithmetic, an image question, a passage
    docs = python_docs[1][:2]
    first = json.loads(test.read_text().splitlines()[0])
    user = [{"id": "u-sum", "image": None, "conversations": [{"from": "human", "value": "What is 12+7?"},
                                                            {"from": "gpt", "value": "19"}]},
            {"id": "u-img", "image": first["image"], "conversations": first["conversations"]},
            {"id": "u-doc", "image": None, "conversations": docs[0].conversations}]
    with open(test, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in [r.to_json() for r in docs] + user)
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
    assert result["n_records"] == 17
    docs_tasks = {t for t in result["by_task"] if t.startswith("docs-")}
    assert set(result["by_task"]) == {"name", "digit", "sum", "qa", "long-answer"} | docs_tasks and docs_tasks
    assert set(result["by_source"]) == {"fashion-mnist", "digits", "arithmetic", "python-docs", "images", "text"}
    # text-only short answers are scored like image QA; passages by perplexity only
    assert 0.0 <= result["by_task"]["sum"]["accuracy"] <= 1.0 and result["by_task"]["sum"]["n_qa"] == 2
    assert result["by_task"]["qa"]["n_qa"] == 2                     # the user's "What is 12+7?" and image question
    assert all(result["by_task"][t]["accuracy"] is None and result["by_task"][t]["perplexity"] > 1.0
               for t in docs_tasks | {"long-answer"})
    assert 0.0 <= result["by_task"]["name"]["accuracy"] <= 1.0
    # no prepare.json beside this test file: no chance level, only the labelled oracle figure
    assert result["chance"] == {}
    assert set(result["chance_oracle"]) == {"name", "digit", "sum", "qa"}
    assert "oracle chance %" in (out / "eval.md").read_text()
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 17 and all(p["n_tokens"] > 0 and p["nll"] > 0 for p in preds)
    assert all((p["prediction"] is None) == (len(p["reference"].split()) > 5) for p in preds)
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


def test_eval_prompt_is_the_training_prompt(tiny_run):
    """What eval feeds the model for a record is the prefix of what training fed it, up to
    the answer: a system turn before the question included."""
    from ddfm.data import open_image
    from ddfm.ensemble import Ensemble
    from ddfm.evaluate import to_request
    from ddfm.model.chat import encode_conversation

    ens = Ensemble.from_pretrained([str(tiny_run["model"])], mode="uniform")
    image = json.loads(tiny_run["test"].read_text().splitlines()[0])["image"]
    system = {"from": "system", "value": "Answer in one word."}
    convs = [[{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A bag."}],
             [system, {"from": "human", "value": "What is 12+7?"}, {"from": "gpt", "value": "19"}],
             [system, {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A bag."}],
             # the image after the question, as some LLaVA records have it
             [{"from": "human", "value": "What is this?\n<image>"}, {"from": "gpt", "value": "A bag."}]]
    for i, conv in enumerate(convs):
        has_image = "<image>" in conv[-2]["value"]
        rec = Record(id=str(i), conversations=conv, image=image if has_image else None,
                     image_path=tiny_run["test"].parent / image if has_image else None)
        prompt = ens.prompts.encode(to_request(rec)).ids
        enc = encode_conversation(ens.processor, conv, [open_image(rec.image_path)] if has_image else None)
        ids, mask = enc.ids, enc.mask
        assert ids[:len(prompt)] == prompt and mask[len(prompt)] and not any(mask[:len(prompt)]), conv


def test_references_longer_than_max_new_tokens_are_flagged(tiny_run, caplog):
    """A reference the generation budget cannot reach scores 0 whatever the model: say so."""
    from ddfm.cli import main

    out = tiny_run["root"] / "out-cut"
    with caplog.at_level("WARNING"):
        assert main(["eval", str(tiny_run["test"]), "--experts", str(tiny_run["model"]), "--out", str(out),
                     "--batch-size", "8", "--max-new-tokens", "2", "--limit", "12"]) == 0
    result = json.loads((out / "eval.json").read_text())
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    cut = [p["id"] for p in preds if p["prediction"] is not None and p["n_tokens"] - 1 > 2]
    assert cut and result["qa_cut_short"] == {"n": len(cut), "max_new_tokens": 2, "ids": cut}
    assert f"{len(cut)} question-answer record(s)" in caplog.text and "--max-new-tokens" in caplog.text
    assert f"{len(cut)} question-answer record(s)" in (out / "eval.md").read_text()


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
