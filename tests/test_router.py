"""ddfm.router: eq. 29 on the partition's own router files, real images, clear errors."""

import json

import numpy as np
import pytest
import torch
from helpers.data import make_data

from ddfm.embed import EmbedConfig, embed
from ddfm.features.store import load_features  # noqa: E402
from ddfm.partition import PartitionConfig, partition  # noqa: E402
from ddfm.router import Router  # noqa: E402


@pytest.fixture(scope="module")
def parted(tmp_path_factory):
    root = tmp_path_factory.mktemp("router")
    data = make_data(root, n_fashion=16, n_digits=16, n_text=0)
    feats = embed(EmbedConfig(data=[str(data)], encoder="pixels@8", out=str(root / "embed")))
    out = partition(PartitionConfig(data=str(data), features=str(feats), k=2, out=str(root / "part")))
    return root, feats, out


def test_weights_are_softmax_of_scaled_cosine_then_top_k():
    rng = np.random.default_rng(0)
    c = rng.normal(size=(3, 5)).astype(np.float32)
    f = rng.normal(size=(4, 5)).astype(np.float32)
    r = Router(c, temperature=7.0, top_k=3)
    cn = c / np.linalg.norm(c, axis=1, keepdims=True)
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    z = 7.0 * fn @ cn.T
    want = np.exp(z - z.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    assert np.allclose(r.weights(f).numpy(), want, atol=1e-6)
    top1 = r.weights(f, top_k=1).numpy()
    assert np.array_equal(top1.argmax(1), want.argmax(1)) and np.allclose(top1.max(1), 1.0)
    top2 = Router(c, temperature=7.0, top_k=2).weights(f).numpy()
    assert ((top2 > 0).sum(1) == 2).all() and np.allclose(top2.sum(1), 1.0)


def test_loads_partition_files_and_routes_real_images_like_the_features(parted):
    root, feats, out = parted
    meta = json.loads((out / "router.json").read_text())
    for path in (out, out / "router.json"):
        r = Router.load(path)
        assert (r.k, r.temperature, r.top_k, r.encoder_spec) == (2, meta["temperature"], 1, "pixels@8")
        assert torch.allclose(r.cluster_shares, torch.tensor(meta["cluster_shares"]))
    X, keys, _ = load_features(feats)
    # route() encodes the image files with the partition's encoder: same features, eq. 29 on them
    got = r.route(keys[:6], top_k=2)
    z = r.temperature * torch.tensor(X[:6]) @ r.centroids.T
    assert torch.allclose(got, torch.softmax(z, 1), atol=1e-5)
    # top-1 routing sends most records of shard k to expert k (balanced labels may move a few)
    agree = total = 0
    for k in range(2):
        for line in (out / f"shard-{k:02d}.jsonl").read_text().splitlines():
            image = (out / json.loads(line)["image"]).resolve()
            agree += int(r.route([str(image)])[0].argmax()) == k
            total += 1
    assert agree / total >= 0.8


def test_overrides_and_errors(parted, tmp_path):
    _, _, out = parted
    r = Router.load(out, top_k=2, temperature=3.0)
    assert (r.top_k, r.temperature) == (2, 3.0)
    with pytest.raises(FileNotFoundError, match="router file not found"):
        Router.load(tmp_path / "nope.json")
    with pytest.raises(ValueError, match=r"features must be \(B, 64\)"):
        r.weights(np.zeros((1, 5), np.float32))
    bad = tmp_path / "router.json"
    meta = json.loads((out / "router.json").read_text())
    bad.write_text(json.dumps({**meta, "k": 3, "centroids": str((out / "router.safetensors").resolve())}))
    with pytest.raises(ValueError, match="k=3 but"):
        Router.load(bad)
    bad.write_text(json.dumps({k: v for k, v in meta.items() if k != "temperature"}))
    with pytest.raises(ValueError, match="missing field 'temperature'"):
        Router.load(bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        Router(np.eye(2), temperature=0)
