"""The canonical record format (ddfm/data.py): loading, validation messages, round trips."""

import json
import logging

import numpy as np
import pytest
from helpers.data import real_images
from PIL import Image

from ddfm.data import DataError, Record, load_records, open_image, write_records


def _png(path, value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((4, 4), value, dtype=np.uint8), mode="L").save(path)


def _rec(rid, image=None, question="What is this?", answer="a cat", **extra):
    human = ("<image>\n" if image else "") + question
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": answer}], **extra}


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_jsonl_loads_with_images_text_only_and_extra_fields(tmp_path):
    _png(tmp_path / "img" / "a.png")
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a", "img/a.png", source="s", task="t", label=3),
                                          _rec("b", None, question="Say hi.", answer="hi"), ""])
    res = load_records(path)
    assert [r.id for r in res.records] == ["a", "b"] and not res.errors and not res.missing_images
    a, b = res.records
    assert a.image_path == tmp_path / "img" / "a.png" and a.has_image
    assert a.source == "s" and a.task == "t" and a.extra["label"] == 3
    assert a.prompt() == "<image>\nWhat is this?" and a.answer() == "a cat"
    assert b.image is None and b.image_path is None and not b.has_image and b.task == "qa" and b.source == "text"


def test_llava_json_list_loads_as_is(tmp_path):
    # LLaVA's own files: a JSON list, integer ids, an image but no placeholder in the prompt
    _png(tmp_path / "coco" / "x.jpg.png")
    rows = [{"id": 7, "image": "coco/x.jpg.png",
             "conversations": [{"from": "human", "value": "Describe it."},
                               {"from": "gpt", "value": "A plate."},
                               {"from": "human", "value": "Colour?"},
                               {"from": "gpt", "value": "White."}]}]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows, indent=1))
    (r,) = load_records(path).records
    assert r.id == "7"
    assert r.conversations[0]["value"] == "<image>\nDescribe it."  # placeholder prepended
    assert r.answer() == "A plate." and len(r.conversations) == 4


BAD = [
    ('{"id": "x", "conversations": [', "<line>", "invalid JSON"),
    (_rec(None), "id", "missing"),
    ({"id": "x", "conversations": [{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "a"}]},
     "conversations[0].from", "must be one of"),
    ({"id": "x", "conversations": [{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}]},
     "conversations[0].value", "not a string"),
    ({"id": "x", "conversations": [{"from": "human", "value": "hi"}]}, "conversations", "no 'gpt'"),
    ({"id": "x", "image": "a.png", "conversations": [{"from": "human", "value": "<image> <image>"},
                                                     {"from": "gpt", "value": "a"}]},
     "conversations", "2 times"),
    (_rec("x", None, question="<image>\nWhat?"), "conversations", "without an image"),
    ({"id": "x", "conversations": "hello"}, "conversations", "non-empty list"),
    ({"id": "x", "image": 3, "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
     "image", "string path"),
    ([1, 2], "<record>", "JSON object"),
]


@pytest.mark.parametrize("bad,field,words", BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_each_bad_record_is_reported_with_file_line_and_field(tmp_path, bad, field, words):
    _png(tmp_path / "a.png")
    path = _jsonl(tmp_path / "d.jsonl", [_rec("ok1"), bad, _rec("ok2")])
    with pytest.raises(DataError) as info:
        load_records(path)
    errs = info.value.errors
    assert any(e.line == 2 and e.field == field and words in e.message for e in errs), errs
    msg = str(info.value)
    assert str(path) in msg and f":2: field '{field}'" in msg


def test_duplicate_id_names_both_lines(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a"), _rec("b"), _rec("a")])
    with pytest.raises(DataError, match=r"d.jsonl:3: field 'id': duplicate id 'a' \(first on line 1\)"):
        load_records(path)


def test_non_strict_skips_bad_records_and_returns_errors(tmp_path, caplog):
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a"), "not json", _rec(""), _rec("a"), _rec("b")])
    with caplog.at_level(logging.WARNING):
        res = load_records(path, strict=False)
    assert [r.id for r in res.records] == ["a", "b"]
    assert [(e.line, e.field) for e in res.errors] == [(2, "<line>"), (3, "id"), (4, "id")]
    assert "skipping invalid record" in caplog.text


def test_many_errors_are_summarised(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", ["{bad"] * 30)
    with pytest.raises(DataError, match=r"30 invalid record\(s\)") as info:
        load_records(path)
    assert "... and 10 more" in str(info.value) and len(info.value.errors) == 30


def test_missing_image_is_counted_not_fatal(tmp_path, caplog):
    _png(tmp_path / "here.png")
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a", "here.png"), _rec("b", "gone.png"), _rec("c")])
    with caplog.at_level(logging.WARNING):
        res = load_records(path)  # strict, yet a lost image does not stop the run
    assert [r.id for r in res.records] == ["a", "c"] and not res.errors
    (m,) = res.missing_images
    assert (m.line, m.id) == (2, "b") and m.reason == f"image file not found: {tmp_path / 'gone.png'}"
    assert "left out because their image is missing" in caplog.text
    assert len(load_records(path, check_images=False)) == 3


def test_missing_data_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(tmp_path / "nope.jsonl")


def test_truncated_llava_list_is_reported(tmp_path):
    path = tmp_path / "l.json"
    path.write_text('[{"id": 1,\n "conversations": [')
    with pytest.raises(DataError, match="invalid JSON"):
        load_records(path)


def test_round_trip_keeps_extra_fields_and_rewrites_image_paths(tmp_path):
    _png(tmp_path / "data" / "images" / "a.png")
    src = _jsonl(tmp_path / "data" / "train.jsonl",
                 [_rec("a", "images/a.png", source="fashion-mnist", task="fmnist-name", label=7),
                  _rec("t", None, question="Explain os.", answer="os is a module.", section="library")])
    records = load_records(src).records
    # same directory: identical content
    same = tmp_path / "data" / "copy.jsonl"
    write_records(same, records)
    assert [json.loads(x) for x in same.read_text().splitlines()] == \
           [json.loads(x) for x in src.read_text().splitlines()]
    # another directory: the image path is rewritten to reach the same file
    other = tmp_path / "runs" / "part" / "shard-00.jsonl"
    write_records(other, records)
    back = load_records(other).records
    assert json.loads(other.read_text().splitlines()[0])["image"] == "../../data/images/a.png"
    assert back[0].image_path.resolve() == (tmp_path / "data" / "images" / "a.png").resolve()
    assert back[0].extra == {"source": "fashion-mnist", "task": "fmnist-name", "label": 7}
    assert back[1].extra == {"section": "library"} and back[1].image is None
    assert [r.conversations for r in back] == [r.conversations for r in records]


def test_record_without_image_path_keeps_its_image_string(tmp_path):
    r = Record(id="x", image="images/a.png", conversations=[{"from": "gpt", "value": "a"}])
    assert r.to_json(relative_to=tmp_path)["image"] == "images/a.png"


def test_open_image_decodes_to_rgb_and_names_bad_files(tmp_path):
    _png(tmp_path / "ok.png", 200)
    img = open_image(tmp_path / "ok.png")
    assert img.mode == "RGB" and img.size == (4, 4) and img.getpixel((0, 0)) == (200, 200, 200)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match=r"unreadable image .*bad\.png"):
        open_image(bad)


def _real_png(path, index=0):
    """A real Fashion-MNIST training image (sklearn digits if the Debian package is absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    real_images(index + 1)[0][index].save(path)
    return path


def test_records_know_their_file_and_line(tmp_path):
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a"), "", _rec("b")])
    assert [(r.file, r.line) for r in load_records(path).records] == [(str(path), 1), (str(path), 3)]
    llava = tmp_path / "l.json"
    llava.write_text(json.dumps([_rec("x"), _rec("y")]))
    assert [r.line for r in load_records(llava).records] == [1, 2]


def test_check_images_leaves_out_missing_and_unreadable_images_once_per_image(tmp_path):
    from ddfm.data import check_images

    ok = _real_png(tmp_path / "ok.png")
    data = ok.read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.png").write_bytes(b"garbage, not an image" * 10)
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a", "ok.png"), _rec("t1", "truncated.png"), _rec("text"),
                                         _rec("g", "garbage.png"), _rec("t2", "truncated.png"),
                                         _rec("m1", "gone.png"), _rec("m2", "gone.png")])
    records = load_records(path, check_images=False).records
    kept, failed = check_images(records)
    assert [r.id for r in kept] == ["a", "text"]
    assert [(f.id, f.line) for f in failed] == [("t1", 2), ("g", 4), ("t2", 5), ("m1", 6), ("m2", 7)]
    reasons = {f.id: f.reason for f in failed}
    assert reasons["t1"] == reasons["t2"] and "unreadable image" in reasons["t1"] and "truncated" in reasons["t1"]
    assert "cannot identify image file" in reasons["g"]
    assert reasons["m1"].startswith("image file not found: ") and reasons["m1"].endswith("gone.png")
    row = failed[0].to_json()
    assert row == {"file": str(path), "line": 2, "id": "t1", "image": str(tmp_path / "truncated.png"),
                   "reason": reasons["t1"]}
    assert str(failed[0]) == f"{path}:2: record 't1': {reasons['t1']}"
    # load_records reports its missing images in the same form
    assert [(f.id, f.line, f.reason) for f in load_records(path).missing_images] == \
           [(f.id, f.line, f.reason) for f in failed if f.id.startswith("m")]


def test_open_image_names_missing_files_and_refuses_decompression_bombs(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"image file not found: .*absent\.png"):
        open_image(tmp_path / "absent.png")
    big = _real_png(tmp_path / "big.png")  # 28 x 28 = 784 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images > 2x the limit outright
    with pytest.raises(ValueError, match=r"unreadable image .*big\.png"):
        open_image(big)


def test_truncated_images_fail_even_when_the_process_allows_them(tmp_path, monkeypatch):
    """Importing lmms_eval sets Pillow's LOAD_TRUNCATED_IMAGES globally; ddfm's decoders stay strict."""
    from PIL import ImageFile

    from ddfm.data import open_image
    from ddfm.serve.errors import ApiError
    from ddfm.serve.images import decode_image

    data = _real_png(tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ValueError, match="truncated"):
        open_image(tmp_path / "truncated.png")
    with pytest.raises(ApiError, match="corrupt"):
        decode_image(data[: len(data) // 2], "messages[0].content[1]", 10**6)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process's own setting is put back
    assert open_image(tmp_path / "ok.png").mode == "RGB"  # a whole image still decodes


def test_strict_decodes_in_parallel_threads_all_refuse_truncation_and_restore_the_flag(tmp_path, monkeypatch):
    """Overlapping strict decodes share one False window; the last one out restores the flag."""
    import concurrent.futures

    from PIL import ImageFile

    from ddfm.data import open_image

    data = _real_png(tmp_path / "ok.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    def decode(i):
        try:
            open_image(tmp_path / ("truncated.png" if i % 2 else "ok.png"))
            return "ok"
        except ValueError as err:
            return "truncated" if "truncated" in str(err) else str(err)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(decode, range(200)))
    assert got == ["ok", "truncated"] * 100
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
