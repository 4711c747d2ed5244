"""Balanced k-means vs faiss spherical k-means (unbalanced), same data, same run.

    .venv/bin/python benchmarks/bench_kmeans.py                      # 200,000 x 512 + Fashion-MNIST
    .venv/bin/python benchmarks/bench_kmeans.py --n 50000 --iters 5 --no-real

For each data set: time per iteration of faiss.Kmeans(spherical=True) and of
ddfm.kmeans.BalancedKMeans at K = 2 and 16 (fixed iteration count, tol = 0), the ratio,
and the balance (max/min cluster size) each reaches; then TwoStageKMeans (m = 1024 fine
clusters, balance by samples and by centroids). faiss is told to use every point
(``max_points_per_centroid``), otherwise it would train on a 256·K subsample and the
comparison would not be per iteration on the same data. Target: ratio <= 1.5 at K = 16
with exact balance (max - min <= 1).

BalancedKMeans runs twice: as shipped (warm-up steps balanced to 1 % while the objective
still gains > 1e-3 per iteration, then exact steps, the last always exact) and with every
step exact (``warmup_tol=None``). The ``steps`` column shows which were which (w / E) and
``scored`` the share of points each step scored (``algorithm="bounds"``). Each method
runs ``--repeats`` times, alternating, and the fastest run counts: on a shared 2-core
machine a busy spell otherwise decides the ratio.

Data: a mixture of 64 Gaussians on the unit sphere (structured, seeded) and the real
Fashion-MNIST training images (Debian ``dataset-fashion-mnist``) embedded with the
``pixels`` encoder of ddfm.embed (``--real-encoder`` for another one).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def sphere_mixture(n: int, d: int, components: int = 64, noise: float = 0.7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(components, d)).astype(np.float32)
    X = means[rng.integers(components, size=n)] + noise * rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def fashion_mnist_features(encoder_spec: str, limit: int | None) -> np.ndarray:
    from PIL import Image

    from ddfm.embed import get_encoder

    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    raw = raw[:limit] if limit else raw
    enc = get_encoder(encoder_spec)
    out = [enc.encode([Image.fromarray(x) for x in raw[a:a + 1024]]) for a in range(0, len(raw), 1024)]
    return np.concatenate(out).astype(np.float32)


def faiss_run(X: np.ndarray, k: int, iters: int, seed: int) -> dict:
    import faiss

    km = faiss.Kmeans(X.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, -(-len(X) // k)))
    t = time.perf_counter()
    km.train(X)
    total = time.perf_counter() - t
    _, nearest = km.index.search(X, 1)
    sizes = np.bincount(nearest[:, 0], minlength=k)
    return {"per_iter": total / iters, "total": total, "max": int(sizes.max()), "min": int(sizes.min())}


def ours_run(X: np.ndarray, k: int, iters: int, seed: int, **options) -> dict:
    from ddfm.kmeans import BalancedKMeans

    t = time.perf_counter()
    km = BalancedKMeans(k, max_iter=iters, tol=0.0, seed=seed, **options).fit(X)
    total = time.perf_counter() - t
    sizes = np.bincount(km.labels_, minlength=k)
    info = km.fit_info_
    return {"per_iter": float(np.mean(info["seconds"])), "total": total, "iters": km.n_iter_,
            "max": int(sizes.max()), "min": int(sizes.min()), "newton_steps": info["newton_steps"],
            "sweeps": info["sweeps"], "repair_moves": info["repair_moves"], "scored": info["scored"],
            "exact": info["exact"]}


def two_stage_run(X: np.ndarray, k: int, m: int, iters: int, seed: int, balance_by: str) -> dict:
    from ddfm.kmeans import TwoStageKMeans

    t = time.perf_counter()
    km = TwoStageKMeans(k, n_fine=m, balance_by=balance_by, fine_iter=iters, seed=seed).fit(X)
    total = time.perf_counter() - t
    info = km.fit_info_
    sizes = np.bincount(km.labels_, minlength=k)
    return {"total": total, "fine_per_iter": info["seconds_fine"] / iters, "coarse": info["seconds_coarse"],
            "max": int(sizes.max()), "min": int(sizes.min()), "backend": info["backend"],
            "centroids_per_cluster": info["centroids_per_cluster"]}


def fastest(runs: list[dict]) -> dict:
    """The run with the least time per iteration (the others were slowed by something else)."""
    return min(runs, key=lambda r: r["per_iter"])


def bench(name: str, X: np.ndarray, ks: list[int], iters: int, m: int, seed: int, two_stage: bool,
          repeats: int = 3) -> list[dict]:
    print(f"\n== {name}: {X.shape[0]} x {X.shape[1]} float32, {iters} iterations, best of {repeats} ==")
    print(f"{'method':<34}{'s/iter':>9}{'total s':>9}{'ratio':>8}{'max/min size':>18}")
    rows = []
    variants = [("", {}), (", all exact", {"warmup_tol": None})]  # the default warms up first
    for k in ks:
        f_runs, o_runs = [], {label: [] for label, _ in variants}
        for _ in range(repeats):  # alternate, so that a busy spell hits every side alike
            f_runs.append(faiss_run(X, k, iters, seed))
            for label, options in variants:
                o_runs[label].append(ours_run(X, k, iters, seed, **options))
        f = fastest(f_runs)
        print(f"{'faiss spherical K=%d' % k:<34}{f['per_iter']:>9.3f}{f['total']:>9.2f}{'':>8}"
              f"{'%d/%d' % (f['max'], f['min']):>18}")
        for label, options in variants:
            o = fastest(o_runs[label])
            ratio = o["per_iter"] / f["per_iter"]
            steps = "".join("E" if e else "w" for e in o["exact"])
            print(f"{'BalancedKMeans K=%d%s' % (k, label):<34}{o['per_iter']:>9.3f}{o['total']:>9.2f}{ratio:>8.2f}"
                  f"{'%d/%d' % (o['max'], o['min']):>18}   steps {steps}, scored "
                  f"{[round(s / len(X), 2) for s in o['scored']]}")
            rows.append({"data": name, "k": k, "variant": label.strip(", ") or "default", "options": options,
                         "faiss": f, "ours": o, "ratio_per_iter": ratio})
    if two_stage:
        f = faiss_run(X, m, iters, seed)
        print(f"{'faiss spherical K=%d' % m:<34}{f['per_iter']:>9.3f}{f['total']:>9.2f}")
        for by in ("samples", "centroids"):
            t = two_stage_run(X, ks[-1], m, iters, seed, by)
            print(f"{'TwoStage m=%d K=%d by %s' % (m, ks[-1], by):<34}{t['fine_per_iter']:>9.3f}{t['total']:>9.2f}"
                  f"{t['fine_per_iter'] / f['per_iter']:>8.2f}{'%d/%d' % (t['max'], t['min']):>18}"
                  f"   (s/iter = fine stage, {t['backend']}; coarse stage {t['coarse']:.2f} s)")
            rows.append({"data": name, "k": ks[-1], "m": m, "balance_by": by, "two_stage": t, "faiss_m": f})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, nargs="+", default=[2, 16])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fine", type=int, default=1024, help="two-stage fine clusters m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action=argparse.BooleanOptionalAction, default=True,
                   help="also run on embedded Fashion-MNIST train images")
    p.add_argument("--real-encoder", default="pixels")
    p.add_argument("--real-limit", type=int, default=None)
    p.add_argument("--two-stage", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--repeats", type=int, default=3, help="runs per method; the fastest counts")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    a = p.parse_args()
    import faiss
    import torch

    print(f"threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}")
    rows = bench("sphere mixture", sphere_mixture(a.n, a.dim, seed=a.seed), a.k, a.iters, a.fine, a.seed, a.two_stage,
                 a.repeats)
    if a.real:
        X = fashion_mnist_features(a.real_encoder, a.real_limit)
        rows += bench(f"Fashion-MNIST train, {a.real_encoder}", X, a.k, a.iters, a.fine, a.seed, a.two_stage,
                      a.repeats)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
