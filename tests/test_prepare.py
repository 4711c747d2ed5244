"""ddfm prepare on the real offline sources (Debian Fashion-MNIST, sklearn digits, Python docs)."""

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddfm import prepare as P
from ddfm.data import load_records
from ddfm.io import read_json
from ddfm.prepare import images as image_sources
from ddfm.prepare import rst, sources
from ddfm.prepare.offline import FASHION_MNIST_DIR

SMALL = {"train_size": 60, "test_size": 30}
IMAGE_TASKS = {"fmnist-name", "fmnist-category", "fmnist-yesno", "fmnist-caption",
               "digits-read", "digits-parity", "digits-yesno", "digits-caption"}


def _prepare(out, source="mix", **kw):
    return P.prepare(P.PrepareConfig(source=source, out=str(out), **kw))


def _load(out):
    return load_records(out / "train.jsonl").records, load_records(out / "test.jsonl").records


@pytest.fixture(scope="module")
def mix_dir(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("mix"), "mix", seed=3, **SMALL)


def test_mix_records_load_and_contain_every_task(mix_dir):
    train, test = _load(mix_dir)
    for split in (train, test):
        tasks = {r.task for r in split}
        assert IMAGE_TASKS <= tasks
        assert any(t.startswith("docs-") for t in tasks)
        assert all(r.source in ("fashion-mnist", "digits", "python-docs") for r in split)
    # image counts: 2:1 Fashion-MNIST : digits, as asked
    imgs = Counter((r.source, r.image) for r in train if r.image)
    assert len(imgs) == 60 and Counter(s for s, _ in imgs) == {"fashion-mnist": 40, "digits": 20}
    assert len({r.image for r in test if r.image}) == 30


def test_mix_each_image_serves_several_short_answer_tasks(mix_dir):
    train, _ = _load(mix_dir)
    per_image = Counter(r.image for r in train if r.image)
    assert set(per_image.values()) == {4}
    for r in train:
        if r.image:
            assert r.prompt().startswith("<image>\n") and 1 <= len(r.answer().split()) <= 4
            assert r.image_path.is_file()
    by_image = {}
    for r in train:
        if r.image:
            by_image.setdefault(r.image, {})[r.task] = r.answer()
    for answers in by_image.values():  # answers of one image agree with each other
        if "fmnist-name" in answers:
            assert answers["fmnist-caption"].endswith(answers["fmnist-name"])
            cat = image_sources.FMNIST_CATEGORIES[image_sources.FMNIST_NAMES.index(answers["fmnist-name"])]
            assert answers["fmnist-category"] == cat
        else:
            d = int(answers["digits-read"])
            assert answers["digits-parity"] == ("even" if d % 2 == 0 else "odd")
            assert answers["digits-caption"].endswith(image_sources.DIGIT_WORDS[d])
    # a yes/no answer says whether the image's class has the property asked about
    for r in train:
        if r.task.endswith("-yesno"):
            props = image_sources.IMAGE_SOURCES[r.source]["properties"]
            [labels] = [labels for phrasings, labels in props if r.prompt().split("\n")[-1] in phrasings]
            assert r.answer() == ("yes" if r.extra["label"] in labels else "no")


def test_mix_text_share_and_yes_no_balance(mix_dir):
    train, test = _load(mix_dir)
    for split in (train, test):
        text = sum(not r.has_image for r in split)
        assert abs(text / len(split) - 0.12) < 0.02
        assert all(r.prompt().startswith("Explain") or r.prompt().startswith("Continue") for r in split if not r.has_image)
        for task in ("fmnist-yesno", "digits-yesno"):
            answers = Counter(r.answer() for r in split if r.task == task)
            assert set(answers) == {"yes", "no"} and abs(answers["yes"] - answers["no"]) <= 1


def test_prepare_json_counts_and_chance_levels(mix_dir):
    meta = read_json(mix_dir / "prepare.json")
    train, test = _load(mix_dir)
    assert meta["source"] == "mix" and meta["seed"] == 3
    assert meta["counts"]["train"]["records"] == len(train) and meta["counts"]["test"]["records"] == len(test)
    assert meta["counts"]["train"]["by_task"] == dict(Counter(r.task for r in train))
    assert meta["counts"]["test"]["images"] == 30
    tasks = meta["tasks"]
    for name in IMAGE_TASKS:
        t = tasks[name]
        answers = {r.answer() for r in train + test if r.task == name}
        assert t["kind"] == "qa" and set(t["answers"]) == answers and t["n_answers"] == len(answers)
        assert t["chance_uniform"] == pytest.approx(1 / len(answers))
        te = [r.answer() for r in test if r.task == name]
        assert t["chance_majority"] == pytest.approx(te.count(t["majority_answer"]) / len(te))
    assert tasks["fmnist-yesno"]["answers"] == ["no", "yes"] and tasks["digits-parity"]["n_answers"] == 2
    assert tasks["fmnist-category"]["answers"] == ["bags", "bottoms", "dresses", "footwear", "tops"]
    assert all(v["kind"] == "text" and "answers" not in v for k, v in tasks.items() if k.startswith("docs-"))


@pytest.mark.slow
def test_determinism_same_seed_same_bytes_other_seed_differs(tmp_path, mix_dir):
    again = _prepare(tmp_path / "again", "mix", seed=3, **SMALL)
    for f in ("train.jsonl", "test.jsonl"):
        assert (again / f).read_bytes() == (mix_dir / f).read_bytes()
    pngs = sorted(p.relative_to(mix_dir) for p in (mix_dir / "images").rglob("*.png"))
    assert pngs == sorted(p.relative_to(again) for p in (again / "images").rglob("*.png"))
    assert all((mix_dir / p).read_bytes() == (again / p).read_bytes() for p in pngs)
    a = read_json(again / "prepare.json")
    b = read_json(mix_dir / "prepare.json")
    assert a["tasks"] == b["tasks"] and a["counts"] == b["counts"]
    other = _prepare(tmp_path / "other", "mix", seed=4, **SMALL)
    assert (other / "train.jsonl").read_bytes() != (mix_dir / "train.jsonl").read_bytes()


def test_rerun_is_skipped_force_rebuilds_new_config_drops_stale_images(tmp_path, caplog):
    out = _prepare(tmp_path / "d", "digits", train_size=20, test_size=10)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    caplog.set_level("INFO")
    _prepare(out, "digits", train_size=20, test_size=10)
    assert "up to date" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    (out / "train.jsonl").write_text("")  # a damaged output is not "complete"
    _prepare(out, "digits", train_size=20, test_size=10)
    assert len(load_records(out / "train.jsonl")) == 80
    _prepare(out, "digits", train_size=10, test_size=5)  # new config: rebuilt, stale PNGs gone
    assert len(list((out / "images").rglob("*.png"))) == 15
    assert read_json(out / "prepare.json")["options"]["train_size"] == 10
    assert not list(out.rglob(".*.tmp"))


def test_fashion_mnist_pixels_and_official_split(tmp_path):
    out = _prepare(tmp_path / "f", "fashion-mnist", train_size=50, test_size=20, tasks_per_image=2)
    train, test = _load(out)
    raw = {s: image_sources._read_idx(Path(FASHION_MNIST_DIR) / f"{p}-images-idx3-ubyte.gz")
           for s, p in (("train", "train"), ("test", "t10k"))}
    labels = image_sources._read_idx(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz")
    assert raw["train"].shape == (60000, 28, 28) and raw["test"].shape == (10000, 28, 28)
    for split, recs in (("train", train), ("test", test)):
        assert Counter(r.image for r in recs).most_common(1)[0][1] == 2  # tasks_per_image
        assert all(f"images/fashion-mnist/{split}/" in r.image for r in recs)
        r = recs[0]
        idx = int(Path(r.image).stem)
        png = np.asarray(Image.open(r.image_path))
        assert np.array_equal(png, raw[split][idx])  # the PNG is the IDX image, losslessly
    for r in test:
        assert r.extra["label"] == int(labels[int(Path(r.image).stem)])
    # class-stratified sampling: 50 train images -> 5 per class
    per_class = Counter(r.extra["label"] for r in {r.image: r for r in train}.values())
    assert set(per_class.values()) == {5}


def test_digits_split_is_fixed_stratified_and_disjoint():
    data = image_sources._load_digits("")
    x_tr, y_tr = data["train"]
    x_te, y_te = data["test"]
    assert len(x_tr) == 1437 and len(x_te) == 360 and x_tr.shape[1:] == (8, 8)
    from sklearn.datasets import load_digits
    full = load_digits()
    # the two splits are the whole dataset, each image once
    def as_bytes(xs):
        return Counter(x.tobytes() for x in xs)

    ref = np.round(full.images * (255 / 16)).astype(np.uint8)
    assert as_bytes(x_tr) + as_bytes(x_te) == as_bytes(ref)
    assert np.allclose(np.bincount(y_te) / len(y_te), np.bincount(full.target) / len(full.target), atol=0.01)
    # fixed: --seed does not move an image between train and test
    a, _ = P.build_source("digits", seed=0, train_size=1437, tasks_per_image=1)
    b, _ = P.build_source("digits", seed=9, train_size=1437, tasks_per_image=1)
    assert {r.image for r in a} == {r.image for r in b}


def test_python_docs_text_records_split_by_file(tmp_path, python_docs):
    train, test = python_docs
    assert len(train) > 10000 and len(test) > 1000
    for r in train[:2000] + test[:500]:
        assert r.image is None and r.source == "python-docs" and r.task == "docs-" + r.extra["section"]
        assert 8 <= len(r.answer().split()) <= 60 and "<image>" not in r.prompt()
        assert ":func:`" not in r.answer() and ".. index::" not in r.answer()
    assert not {r.extra["doc"] for r in train} & {r.extra["doc"] for r in test}
    sections = {r.extra["section"] for r in train}
    assert {"library", "c-api", "howto", "tutorial", "reference"} <= sections
    assert {"library", "tutorial", "reference"} <= {r.extra["section"] for r in test}
    # limits sample, and the files load as canonical records
    out = _prepare(tmp_path / "docs", "python-docs", train_size=50, test_size=20)
    tr, te = _load(out)
    assert (len(tr), len(te)) == (50, 20) and not (out / "images").exists()
    assert read_json(out / "prepare.json")["counts"]["train"]["text_only"] == 50


def test_parse_rst_turns_markup_into_headed_passages():
    text = """\
:mod:`spam` --- Canned meat
===========================

.. module:: spam
   :synopsis: Meat.

.. index:: single: spam

Intro with :func:`~spam.eat` and ``code`` and `a link <https://x.org>`_.

.. function:: eat(n)
              eat(n, m)

   Eat *n* cans, see :ref:`the guide <guide>`.

   .. versionchanged:: 3.8
      Accepts floats.

.. _guide:

Guide
-----

.. note::

   Keep it cold.

>>> eat(1)
1
"""
    title, entries = P.parse_rst(text)
    assert title == "spam"
    assert entries == [
        ("spam --- Canned meat", ["Intro with eat and `code` and a link."]),
        ("eat(n)", ["Eat *n* cans, see the guide.", "Changed in version 3.8: Accepts floats."]),
        ("Guide", ["Note: Keep it cold.", ">>> eat(1)\n1"]),
    ]
    assert rst.chunks(["a b c", "d e", "f g h i j"], 5) == ["a b c\nd e", "f g h i j"]
    assert rst.chunks(["w " * 12], 5) == ["w w w w w", "w w w w w", "w w"]


def test_missing_sources_name_the_debian_package(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*sudo apt-get install dataset-fashion-mnist"):
        P.build_source("fashion-mnist", fashion_mnist_dir=str(empty))
    with pytest.raises(FileNotFoundError, match=r"python3\.11-doc"):
        P.build_source("python-docs", python_docs_dir=str(empty))
    with pytest.raises(FileNotFoundError, match=r"python3\.11-doc"):  # the mix needs the text too
        _prepare(tmp_path / "m", "mix", python_docs_dir=str(empty), **SMALL)
    assert not (tmp_path / "m" / "prepare.json").exists()


def test_config_validation():
    with pytest.raises(ValueError, match=r"unknown source 'imagenet'; known sources: fashion-mnist, digits, python-docs, mix"):
        P.PrepareConfig(source="imagenet")
    for kw, field in (({"train_size": 0}, "train_size"), ({"tasks_per_image": 5}, "tasks_per_image"),
                      ({"text_share": 1.0}, "text_share"), ({"max_words": 2}, "max_words")):
        with pytest.raises(ValueError, match=field):
            P.PrepareConfig(source="mix", **kw)
    with pytest.raises(ValueError, match="unknown option"):
        P.build_source("digits", max_images=3)


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run([sys.executable, "-m", "ddfm", "prepare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_prepare_digits_end_to_end(tmp_path):
    res = _cli("digits", "--out", "tmp", "--train-size", "30", "--test-size", "10", "--seed", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "tmp"
    train, test = _load(out)
    assert len(train) == 120 and len(test) == 40
    assert json.loads((out / "prepare.json").read_text())["config"]["seed"] == 1
    assert "digits -> tmp: train 120 records (30 images, 0 text)" in res.stderr
    bad = _cli("digits", "--out", "x", "--fashion-mnist-dir", "/nonexistent", "--train-size", "0", cwd=tmp_path)
    assert bad.returncode == 2 and "ddfm prepare: error: train_size: must be a positive integer" in bad.stderr
    missing = _cli("fashion-mnist", "--out", "x", "--fashion-mnist-dir", str(tmp_path), cwd=tmp_path)
    assert missing.returncode == 2 and "sudo apt-get install dataset-fashion-mnist" in missing.stderr


@pytest.mark.slow
def test_default_mix_has_demo_size(tmp_path):
    out = _prepare(tmp_path / "mix", "mix")
    meta = read_json(out / "prepare.json")
    c = meta["counts"]
    assert (c["train"]["images"], c["test"]["images"]) == (3000, 500)
    assert 0.10 <= c["train"]["text_only"] / c["train"]["records"] <= 0.15
    assert meta["tasks"]["fmnist-name"]["chance_uniform"] == pytest.approx(0.1)
    train, test = _load(out)
    assert not {r.image for r in train if r.image} & {r.image for r in test if r.image}


def _splits(out):
    return {s: load_records(out / f"{s}.jsonl").records for s in ("train", "test", "val", "align", "pretrain")}


def test_val_align_and_pretrain_splits_are_disjoint(tmp_path):
    """The splits of the paper's regime, small: val (every image task) and align (a caption per
    image) from train-split images that neither train nor test took; pretrain is python-docs text
    from the train files only (the slow test below runs digits out)."""
    out = P.prepare(P.PrepareConfig(source="mix", out=str(tmp_path / "m"), train_size=60, test_size=30,
                                    val_size=60, align_size=30, pretrain_size=10, text_share=0.05))
    splits = _splits(out)
    images = {s: {str(r.image_path) for r in recs if r.has_image} for s, recs in splits.items()}
    assert len(images["train"]) == 60 and len(images["align"]) == 30
    for s in ("val", "align"):
        assert not images[s] & images["train"] and not images[s] & images["test"], s
    assert not images["align"] & images["val"]
    assert {r.task.split("-")[1] for r in splits["align"]} == {"caption"}
    assert {r.task for r in splits["val"]} == {r.task for r in splits["train"] if r.has_image}
    assert all(not r.has_image and r.source == "python-docs" for r in splits["pretrain"]) and len(splits["pretrain"]) == 10
    test_docs = {r.extra["doc"] for r in splits["test"] if not r.has_image}
    assert not {r.extra["doc"] for r in splits["pretrain"]} & test_docs
    assert set(read_json(out / "prepare.json")["files"]) == {"train", "test", "val", "align", "pretrain"}


@pytest.mark.slow
def test_val_align_and_pretrain_splits_are_disjoint_where_images_last(tmp_path):
    """The splits of the paper's regime: val (held out, every task) and align (a caption
    per image) from train-split images that train did not take; digits (1,437 images)
    run out, so align reuses train digits and says so; pretrain is python-docs text from
    the train files only."""
    out = P.prepare(P.PrepareConfig(source="mix", out=str(tmp_path / "m"), train_size=3000, test_size=60,
                                    val_size=120, align_size=1800, pretrain_size=40, text_share=0.05))
    splits = _splits(out)
    images = {s: {str(r.image_path) for r in recs if r.has_image} for s, recs in splits.items()}
    assert not images["val"] & images["train"] and not images["val"] & images["test"]
    assert not images["align"] & images["val"] and not images["align"] & images["test"]
    by_source = {s: Counter(r.source for r in splits[s] if r.has_image) for s in ("train", "align")}
    # 3000 train images: digits' third (1000) fits; the align split takes the 1437-1000-40 digits
    # left and reuses train digits for the rest of its third
    assert len(images["train"]) == 3000 and len(images["align"]) == 1800
    align_digits = {str(r.image_path) for r in splits["align"] if r.source == "digits"}
    assert align_digits & images["train"] and by_source["align"]["digits"] == 600
    assert not {p for p in images["align"] if "fashion" in p} & images["train"]  # Fashion-MNIST does not run out
    assert {r.task.split("-")[1] for r in splits["align"]} == {"caption"}
    assert {r.task for r in splits["val"]} == {r.task for r in splits["train"] if r.has_image}
    assert all(not r.has_image and r.source == "python-docs" for r in splits["pretrain"]) and len(splits["pretrain"]) == 40
    test_docs = {r.extra["doc"] for r in splits["test"] if not r.has_image}
    assert not {r.extra["doc"] for r in splits["pretrain"]} & test_docs
    meta = read_json(out / "prepare.json")
    assert set(meta["files"]) == {"train", "test", "val", "align", "pretrain"}
    assert meta["counts"]["align"]["images"] == 1800


def test_mix_gives_a_short_source_deficit_to_the_others():
    # 9,000 train images at 2:1 would ask 3,000 digits of 1,437: Fashion-MNIST takes the rest
    sizes = sources._mix_sizes({"train_size": 9000, "test_size": 100, "val_size": 300, "align_size": None},
                         P.SOURCES["mix"]["images"])
    assert sizes["digits"]["train"] == 1437 and sizes["fashion-mnist"]["train"] == 9000 - 1437
    assert sizes["digits"]["val"] == 0 and sizes["fashion-mnist"]["val"] == 300  # no digits left for val
