"""Balanced k-means vs faiss spherical k-means (unbalanced): the whole fit, same data, same run.

    .venv/bin/python benchmarks/bench_kmeans.py                      # 200,000 x 512 + Fashion-MNIST
    .venv/bin/python benchmarks/bench_kmeans.py --n 50000 --iters 5 --no-real --data-seeds 0

What is timed is what a user waits for, on both sides, with the same wall clock:

* faiss: ``faiss.Kmeans(spherical=True).train(X)`` — its random initialisation, at most
  ``--iters`` iterations and the centroid updates. faiss is told to use every point
  (``max_points_per_centroid``), otherwise it would train on a 256·K subsample. Its labels
  need one more ``index.search`` over X: that is *not* counted in the headline (it is shown
  as "faiss +labels"), so the headline ratio is the stricter one for us.
* ours: ``BalancedKMeans(K, max_iter=iters, tol=2⁻²⁴).fit(X)`` — input checks, k-means++,
  the iterations, the final exactly balanced ``labels_``, inertia and attributes.

Iterations: both get at most ``--iters`` and both stop when they have converged, by the same
test at the same precision. faiss (1.15 here) stops when its objective, a float32 sum, does
not change from one iteration to the next (``len(km.iteration_stats)`` is the number it
ran); ours stops when the relative gain of two exact steps is at most float32's unit
roundoff (``tol=2⁻²⁴``: a smaller change cannot show in a float32 sum) or no label changed.
Both counts are printed: balanced k-means usually needs more iterations than unbalanced
k-means to reach that point. The headline is ``whole fit ours / whole fit faiss``; the
second ratio is per iteration measured the same way on both sides, total / iterations run
(so it includes each side's initialisation and finish, spread over its iterations).

Each method runs ``--repeats`` times, alternating with the other, and the fastest run
counts (a busy spell on a shared machine hits both alike). faiss and torch get the same
number of threads. The load during the runs (share of CPU time not spent by this process)
is printed with the figures. Target: whole fit ≤ 1.2× faiss at K = 16 with exact balance
(max − min size ≤ 1). The mixture is drawn for each of ``--data-seeds`` (the seed also
seeds both initialisations): how many iterations each side needs depends on the data, so
one draw can flatter either side; the last line gives the ratios' median and maximum.

BalancedKMeans runs as shipped (warm-up steps balanced to 1 % while the objective still
gains > 1e-3 per iteration, the rest and always the last exact; ``steps`` shows w / E) and
with every step exact (``warmup_tol=None``). The two-stage rows time ``TwoStageKMeans`` whole
(fine faiss k-means into m clusters, then the coarse stage), balance by centroids (the
default) and by samples, against faiss at the same K.

Data: a mixture of 64 Gaussians on the unit sphere (structured, seeded) and the real
Fashion-MNIST training images (Debian ``dataset-fashion-mnist``) embedded with the
``pixels`` encoder of ddfm.embed (``--real-encoder`` for another one).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import numpy as np

FMNIST = Path("/usr/share/datasets/fashion-mnist")
TOL = 2.0 ** -24  # float32's unit roundoff: a smaller relative change cannot show in faiss's float32 objective


def sphere_mixture(n: int, d: int, components: int = 64, noise: float = 0.7, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(components, d)).astype(np.float32)
    X = means[rng.integers(components, size=n)] + noise * rng.normal(size=(n, d)).astype(np.float32)
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def fashion_mnist_features(encoder_spec: str, limit: int | None) -> np.ndarray:
    from PIL import Image

    from ddfm.features.registry import get_encoder

    with gzip.open(FMNIST / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    raw = raw[:limit] if limit else raw
    enc = get_encoder(encoder_spec)
    out = [enc.encode([Image.fromarray(x) for x in raw[a:a + 1024]]) for a in range(0, len(raw), 1024)]
    return np.concatenate(out).astype(np.float32)


class Clock:
    """Wall time of a block, and the share of the machine's CPU time that others used meanwhile."""

    def __enter__(self):
        self.cpu, self.wall, self.machine = time.process_time(), time.perf_counter(), _machine_busy()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.wall
        busy = _machine_busy() - self.machine  # CPU-seconds used by everything on the machine
        ours = time.process_time() - self.cpu
        self.others = max(0.0, busy - ours) / (self.seconds * (os.cpu_count() or 1))


def _machine_busy() -> float:
    """CPU-seconds the whole machine has spent busy since boot (/proc/stat), 0 elsewhere."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def faiss_run(X: np.ndarray, k: int, iters: int, seed: int) -> dict:
    import faiss

    km = faiss.Kmeans(X.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, -(-len(X) // k)))
    with Clock() as fit:
        km.train(X)
    with Clock() as search:
        _, nearest = km.index.search(X, 1)
    sizes = np.bincount(nearest[:, 0], minlength=k)
    ran = len(km.iteration_stats)  # faiss stops early once its objective no longer changes
    return {"total": fit.seconds, "iters": ran, "per_iter": fit.seconds / ran, "others": fit.others,
            "with_labels": fit.seconds + search.seconds, "max": int(sizes.max()), "min": int(sizes.min())}


def ours_run(X: np.ndarray, k: int, iters: int, seed: int, **options) -> dict:
    from ddfm.kmeans import BalancedKMeans

    with Clock() as fit:
        km = BalancedKMeans(k, max_iter=iters, tol=TOL, random_state=seed, **options).fit(X)
    sizes = np.bincount(km.labels_, minlength=k)
    info = km.fit_info_
    return {"total": fit.seconds, "iters": km.n_iter_, "per_iter": fit.seconds / km.n_iter_, "others": fit.others,
            "max": int(sizes.max()), "min": int(sizes.min()), "objective": info["objective"][-1],
            "seconds_init": info["seconds_init"], "seconds_iterations": float(sum(info["seconds"])),
            "seconds_finish": info["seconds_finish"], "scored": info["scored"], "exact": info["exact"]}


def two_stage_run(X: np.ndarray, k: int, m: int, iters: int, seed: int, balance_by: str) -> dict:
    from ddfm.kmeans import TwoStageKMeans

    with Clock() as fit:
        km = TwoStageKMeans(k, n_fine=m, balance_by=balance_by, fine_iter=iters, random_state=seed).fit(X)
    info = km.fit_info_
    sizes = np.bincount(km.labels_, minlength=k)
    return {"total": fit.seconds, "others": fit.others, "fine": info["seconds_fine"], "coarse": info["seconds_coarse"],
            "n_fine": info["n_fine"], "max": int(sizes.max()), "min": int(sizes.min()), "backend": info["backend"],
            "centroids_per_cluster": info["centroids_per_cluster"]}


def fastest(runs: list[dict]) -> dict:
    """The run with the least whole-fit time (the others were slowed by something else)."""
    return min(runs, key=lambda r: r["total"])


def compare(X: np.ndarray, k: int, iters: int, seed: int, repeats: int, variants: list[tuple[str, dict]]) -> list[dict]:
    """faiss and each variant of ours, alternating, ``repeats`` times; one row per variant with
    the fastest run of each side and the ratios."""
    f_runs, o_runs = [], {label: [] for label, _ in variants}
    for _ in range(repeats):  # alternate, so that a busy spell hits every side alike
        f_runs.append(faiss_run(X, k, iters, seed))
        for label, options in variants:
            o_runs[label].append(ours_run(X, k, iters, seed, **options))
    f = fastest(f_runs)
    rows = []
    for label, options in variants:
        o = fastest(o_runs[label])
        rows.append({"k": k, "variant": label or "default", "options": options, "faiss": f, "ours": o,
                     "ratio_whole_fit": o["total"] / f["total"], "ratio_per_iter": o["per_iter"] / f["per_iter"]})
    return rows


HEADER = (f"{'method':<30}{'whole s':>9}{'iters':>6}{'s/iter':>8}{'ratio':>7}{'/iter':>7}{'others':>8}"
          f"{'max/min size':>16}")


def _line(name: str, r: dict, ratio: str = "", per: str = "") -> str:
    return (f"{name:<30}{r['total']:>9.3f}{r['iters']:>6}{r['per_iter']:>8.3f}{ratio:>7}"
            f"{per:>7}{r['others']:>8.0%}{'%d/%d' % (r['max'], r['min']):>16}")


def bench(name: str, X: np.ndarray, ks: list[int], iters: int, m: int, seed: int, two_stage: bool,
          repeats: int = 3) -> list[dict]:
    print(f"\n== {name}: {X.shape[0]} x {X.shape[1]} float32, at most {iters} iterations, best of {repeats} ==")
    print("whole s: the whole fit (faiss: train(); ours: fit()); ratio: ours / faiss whole fit; "
          "/iter: the same per iteration (whole / iterations run); others: CPU share used by other processes")
    print(HEADER)
    rows = []
    variants = [("", {}), ("all exact", {"warmup_tol": None})]  # the default warms up first
    for k in ks:
        found = compare(X, k, iters, seed, repeats, variants)
        f = found[0]["faiss"]
        print(_line(f"faiss spherical K={k}", f) + f"   +labels {f['with_labels']:.3f} s")
        for row in found:
            o = row["ours"]
            steps = "".join("E" if e else "w" for e in o["exact"])
            label = f"BalancedKMeans K={k}" + (f", {row['variant']}" if row["variant"] != "default" else "")
            print(_line(label, o, f"{row['ratio_whole_fit']:.2f}", f"{row['ratio_per_iter']:.2f}")
                  + f"   init {o['seconds_init']:.3f} + iterations {o['seconds_iterations']:.3f} + finish "
                    f"{o['seconds_finish']:.3f} s; steps {steps}; scored {[round(s / len(X), 2) for s in o['scored']]}")
            rows.append({"data": name, **row})
    if two_stage:
        k = ks[-1]
        f = fastest([faiss_run(X, k, iters, seed) for _ in range(repeats)])
        for by in ("centroids", "samples"):
            t = fastest([two_stage_run(X, k, m, iters, seed, by) for _ in range(repeats)])
            print(f"{'TwoStage K=%d by %s' % (k, by):<30}{t['total']:>9.3f}{'':>6}{'':>8}"
                  f"{t['total'] / f['total']:>7.2f}{'':>7}{t['others']:>8.0%}{'%d/%d' % (t['max'], t['min']):>16}"
                  f"   m = {t['n_fine']} ({t['backend']}): fine {t['fine']:.2f} s + coarse {t['coarse']:.2f} s; "
                  f"ratio vs faiss K={k}")
            rows.append({"data": name, "k": k, "m": m, "balance_by": by, "two_stage": t, "faiss": f})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, nargs="+", default=[2, 16])
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--fine", type=int, default=1024, help="two-stage: most fine clusters m")
    p.add_argument("--data-seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                   help="draws of the sphere mixture (each also seeds both initialisations)")
    p.add_argument("--seed", type=int, default=0, help="seed of both initialisations on Fashion-MNIST")
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

    faiss.omp_set_num_threads(torch.get_num_threads())  # the same threads on both sides
    print(f"threads: torch {torch.get_num_threads()}, faiss {faiss.omp_get_max_threads()}; "
          f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rows = []
    for i, seed in enumerate(a.data_seeds):  # two-stage on the first draw only: it is the slow part
        rows += bench(f"sphere mixture, seed {seed}", sphere_mixture(a.n, a.dim, seed=seed), a.k, a.iters, a.fine,
                      seed, a.two_stage and i == 0, a.repeats)
    for k in a.k:
        ratios = [r["ratio_whole_fit"] for r in rows if r.get("variant") == "default" and r["k"] == k]
        print(f"\nsphere mixture K={k}, {len(ratios)} draws: whole-fit ratio median {np.median(ratios):.2f}, "
              f"max {max(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})")
    if a.real:
        X = fashion_mnist_features(a.real_encoder, a.real_limit)
        rows += bench(f"Fashion-MNIST train, {a.real_encoder}", X, a.k, a.iters, a.fine, a.seed, a.two_stage,
                      a.repeats)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
