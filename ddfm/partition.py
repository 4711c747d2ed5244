"""Partition stage: balanced k-means of the features into K shards + router + report (paper §4.2).

    ddfm partition data/mix/train.jsonl --features runs/embed --k 2 --out runs/partition
    ddfm partition data/mix/train.jsonl --features runs/embed --k 4 --algorithm two-stage --plot

Balance is over *unique items*: records that share an image share its feature row and go
to the same cluster (the paper balances unique images, not image-text pairs or tokens;
the report shows all three). Text-only records under an image encoder are spread randomly
and equally over the clusters (seeded), as the paper does with LLaVA's text-only samples.
Under a text encoder (modality "text") the records themselves are clustered.

Records whose image failed are left out of every shard (a record that cannot be trained
on must not take a place in the balance, and records sharing the failed image stay
together: out) and are listed in ``report.json`` "left_out" and ``report.md`` with file,
line and reason: under an image encoder, the images ``embed`` could not read (its
``embed.json`` "failed") and any image file missing now; under a text encoder every
image is decoded here (:func:`ddfm.data.check_images`).

Output directory (docs/ARCHITECTURE.md): ``shard-XX.jsonl`` (records in input order,
image paths relative to the shard), ``router.json`` + ``router.safetensors`` (centroids
(K, D) unit rows, temperature τ of eq. 29, top_k = 1, cluster shares π_k),
``report.json`` / ``report.md`` and, with ``--plot``, ``partition.png``. Shards and
router files are byte-identical for the same data, features and seed.

The default τ is calibrated on the training features: the τ in [1, 100] that maximises
the likelihood of the partition's own labels under the soft router
softmax_k(τ · cos(x, c_k)) (temperature scaling, Guo et al. 2017). The router's weights
are then as confident as the clusters are separable: neither uniform nor hard unless the
data is. The search and its result are recorded in ``router.json``.
"""

from __future__ import annotations

import logging
import math
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ddfm.config import arg, to_dict
from ddfm.data import FailedImage, Record, check_images, load_records, log_failed_images, write_records
from ddfm.features.store import load_features, record_key
from ddfm.io import atomic_path, atomic_write_text, save_figure, write_json
from ddfm.kmeans import BalancedKMeans, TwoStageKMeans

log = logging.getLogger(__name__)

TAU_BOUNDS = (1.0, 100.0)  # eq. 29's τ multiplies cosines in [-1, 1]
CALIBRATION_SAMPLE = 100_000
PLOT_SAMPLE = 20_000
SHARD_RE = re.compile(r"^shard-\d+\.jsonl$")


@dataclass
class PartitionConfig:
    data: str = arg("data file (JSON Lines or LLaVA JSON list) to split into shards", positional=True)
    features: str = arg("features directory written by `ddfm embed` (features.npy, keys.json, embed.json)")
    k: int = arg("number of clusters K (= experts)", short="-k")
    out: str = arg("output directory for shards, router and report", default="runs/partition")
    algorithm: str = arg("clustering algorithm", default="balanced", choices=("balanced", "two-stage"))
    fine_clusters: int = arg("two-stage: the most fine (unbalanced) clusters m; a data set of N items gets "
                             "m = min(this, N // 39), at least k (39 points per fine cluster, below which faiss "
                             "warns); router.json records the m used", default=1024)
    balance_by: str = arg("two-stage: 'centroids' (the paper's Table 9): every cluster gets the same number of "
                          "fine clusters (within one), sample counts are not balanced; 'samples': fine clusters "
                          "weighted by their sample counts, so that max - min samples per cluster is at most the "
                          "smallest fine cluster in the largest cluster (fine clusters are never split)",
                          default="centroids", choices=("samples", "centroids"))
    temperature: Optional[float] = arg("router temperature τ of eq. 29 (default: calibrated on the features)",
                                       default=None)
    seed: int = arg("seed of k-means++ and of the text-only spreading", default=0)
    max_iter: int = arg("maximum k-means iterations", default=50)
    tokenizer: Optional[str] = arg("Hugging Face tokenizer directory for token counts "
                                   "(default: whitespace words)", default=None)
    plot: bool = arg("write partition.png (PCA of the features by cluster + cluster sizes)", default=False)

    def __post_init__(self):
        if self.k < 2:
            raise ValueError(f"k: need at least 2 clusters, got {self.k}")
        if self.algorithm not in ("balanced", "two-stage"):
            raise ValueError(f"algorithm: must be 'balanced' or 'two-stage', got {self.algorithm!r}")
        if self.balance_by not in ("samples", "centroids"):
            raise ValueError(f"balance_by: must be 'samples' or 'centroids', got {self.balance_by!r}")
        if self.algorithm == "two-stage" and self.fine_clusters < self.k:
            raise ValueError(f"fine_clusters: must be >= k ({self.k}), got {self.fine_clusters}")
        if self.temperature is not None and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature: must be a positive number, got {self.temperature}")
        if self.max_iter < 1:
            raise ValueError(f"max_iter: must be >= 1, got {self.max_iter}")


# ----------------------------------------------------------------------- items
@dataclass
class Items:
    """Records mapped to unique feature rows.

    ``rows`` (U,) feature-row index of each unique item (first-appearance order);
    ``record_item`` (R,) index into ``rows`` per record, −1 for text-only records under
    an image encoder (the only records without a row once failed images are left out).
    """

    keys: list[str]
    rows: np.ndarray
    record_item: np.ndarray


def _features(path: str):
    return load_features(path)


def _record_key(record: Record, modality: str) -> str | None:
    return record_key(record, modality)


def leave_out_failed_images(records: list[Record], keys: list[str], meta: dict) -> tuple[list[Record], list[FailedImage]]:
    """Split off the records whose image failed: (records that go into shards, left out).

    Image modality: an image ``embed`` listed as failed (its reason), or a file missing
    now (features alone cannot train). Text modality: every image is decoded here.
    """
    if meta.get("modality") == "text":
        return check_images(records)
    row_of = set(keys)
    failed = {f.get("key"): str(f.get("error")) for f in meta.get("failed", []) if isinstance(f, dict)}
    kept: list[Record] = []
    left_out: list[FailedImage] = []
    for rec in records:
        key = _record_key(rec, "image") if meta.get("modality") == "image" else None
        if key is None:
            kept.append(rec)
        elif key in failed and key not in row_of:
            left_out.append(FailedImage.of(rec, failed[key]))
        elif not rec.image_path.is_file():
            left_out.append(FailedImage.of(rec, f"image file not found: {rec.image_path}"))
        else:
            kept.append(rec)
    return kept, left_out


def map_items(records: list[Record], keys: list[str], meta: dict, features_dir: str) -> Items:
    """Match records to feature rows; raise naming the records the features do not cover."""
    modality = meta.get("modality")
    if modality not in ("image", "text"):
        raise ValueError(f"{features_dir}/embed.json: modality must be 'image' or 'text', got {modality!r}")
    row_of = {k: i for i, k in enumerate(keys)}
    item_of: dict[str, int] = {}
    record_item = np.full(len(records), -1, dtype=np.int64)
    uncovered: list[str] = []
    for r, rec in enumerate(records):
        key = _record_key(rec, modality)
        if key is None:
            continue  # text-only record under an image encoder
        if key not in row_of:
            uncovered.append(rec.id)
            continue
        record_item[r] = item_of.setdefault(key, len(item_of))
    if uncovered:
        raise ValueError(f"{len(uncovered)} record(s) of the data file have no feature row in {features_dir} "
                         f"and were not listed as failed there (first: {', '.join(uncovered[:5])}); "
                         "the features were computed for other data: re-run `ddfm embed` on this data file")
    item_keys = list(item_of)
    return Items(item_keys, np.array([row_of[k] for k in item_keys], dtype=np.int64), record_item)


def item_features(feats: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The unique items' features ``feats[rows]`` (U, D), without a copy when it can.

    ``feats`` is memory-mapped (:func:`ddfm.features.store.load_features`), so it costs page cache,
    not a copy. When the items are exactly its rows in order (the data file partitioned
    is the one embedded) it is returned as it is; otherwise the rows are gathered: one copy.
    """
    if len(rows) == len(feats) and np.array_equal(rows, np.arange(len(feats))):
        return feats
    return feats[rows]


# ----------------------------------------------------------------------- clustering
def make_model(cfg: PartitionConfig):
    """The clustering estimator named by ``cfg.algorithm`` (presets as data). Two-stage
    adapts the number of fine clusters to the data (:class:`ddfm.kmeans.TwoStageKMeans`)."""
    if cfg.algorithm == "balanced":
        return BalancedKMeans(cfg.k, random_state=cfg.seed, max_iter=cfg.max_iter)
    return TwoStageKMeans(cfg.k, n_fine=cfg.fine_clusters, balance_by=cfg.balance_by,
                          random_state=cfg.seed, max_iter=cfg.max_iter)


def spread_free(n_free: int, k: int, seed: int) -> np.ndarray:
    """Clusters for records without a feature row: a seeded random, equal split (sizes differ ≤ 1)."""
    labels = np.empty(n_free, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(n_free)] = np.arange(n_free) % k
    return labels


def calibrate_temperature(X: np.ndarray, centroids: np.ndarray, labels: np.ndarray, *,
                          seed: int = 0, bounds: tuple[float, float] = TAU_BOUNDS) -> dict:
    """Maximum-likelihood τ of eq. 29 for the partition's labels (temperature scaling).

    X (U, D) unit rows, centroids (K, D) unit rows, labels (U,). Minimises the mean
    −log softmax_k(τ·cos(x, c_k))[label] over log τ in ``bounds`` (golden-section search;
    the NLL is convex in τ). Returns τ, its NLL, the mean top router weight, the sample size
    and ``at_bound``: "upper" when the NLL still falls at the upper bound (its slope
    mean_i Σ_k w_ik (cos_ik − cos_i,label) < 0 there: the clusters are so well separated
    that the likelihood wants τ → ∞, and τ is the bound's, not the data's), "lower" when it
    still falls below the lower bound, else None; a bound also logs a warning.
    """
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(X), CALIBRATION_SAMPLE, replace=False)) if len(X) > CALIBRATION_SAMPLE \
        else np.arange(len(X))
    sample = X[idx] if len(idx) < len(X) else X  # all of X: no copy of it
    cos = (sample @ centroids.T).astype(np.float64)  # (n, K)
    own = cos[np.arange(len(idx)), labels[idx]]

    gap = cos - own[:, None]  # (n, K), 0 at the label

    def nll(log_tau: float) -> float:
        # −log softmax(τ cos)[label] = log Σ_k exp(τ gap_k) = top + log1p(Σ_{k ≠ top} ...): the top
        # term is exactly 1, and log1p keeps the rest even when it is 1e-30 (separable
        # clusters), where log(1 + rest) would round to 0 and leave the search a flat NLL
        d = math.exp(log_tau) * gap
        top = d.argmax(1)
        e = np.exp(d - d[np.arange(len(d)), top][:, None])
        e[np.arange(len(d)), top] = 0
        return float((d.max(1) + np.log1p(e.sum(1))).mean())

    a, b = math.log(bounds[0]), math.log(bounds[1])
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(60):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    tau = round(math.exp((a + b) / 2), 4)
    at_bound = _bound_reached(cos, own, bounds)
    if at_bound:
        log.warning("partition: the calibrated router temperature tau = %g is at the %s bound of its search "
                    "range [%g, %g]: %s; tau is set by the bound, not by the data (pass --temperature to choose "
                    "it)", tau, at_bound, bounds[0], bounds[1], _AT_BOUND[at_bound])
    w = _softmax(tau * cos)
    return {"method": "max-likelihood temperature scaling of eq. 29 on the training features "
                      "(Guo et al. 2017), golden-section search over log tau",
            "bounds": list(bounds), "temperature": tau, "at_bound": at_bound, "nll": nll(math.log(tau)),
            "mean_top_weight": float(w.max(1).mean()), "uniform_top_weight": 1.0 / centroids.shape[0],
            "n": int(len(idx))}


_AT_BOUND = {
    "upper": "the likelihood still improves beyond it, i.e. the clusters are (almost) perfectly separable by "
             "cosine to the centroids, and the router's weights are close to one-hot (soft routing is "
             "effectively top-1)",
    "lower": "the likelihood still improves below it, i.e. the clusters are barely separable by cosine to the "
             "centroids, and the router's weights are close to uniform",
}


def _softmax(z: np.ndarray) -> np.ndarray:
    w = np.exp(z - z.max(1, keepdims=True))
    return w / w.sum(1, keepdims=True)


def _bound_reached(cos: np.ndarray, own: np.ndarray, bounds: tuple[float, float]) -> str | None:
    """"upper"/"lower" when the NLL's slope in τ at that bound points out of the range, else
    None. The slope mean_i Σ_k w_ik (cos_ik − own_i) is summed term by term, so that weights
    of 1e-20 (well separated clusters at τ = 100) still give its sign."""
    def slope(tau: float) -> float:
        return float((_softmax(tau * cos) * (cos - own[:, None])).sum(1).mean())

    if slope(bounds[1]) < 0:
        return "upper"
    if slope(bounds[0]) > 0:
        return "lower"
    return None


# ----------------------------------------------------------------------- report
def _token_counter(tokenizer_dir: str | None):
    """(label, count(text) -> int): a real tokenizer if given, else whitespace words."""
    if tokenizer_dir is None:
        return "whitespace words", lambda text: len(text.split())
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer: directory not found: {tokenizer_dir}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return f"tokens ({tokenizer_dir})", lambda text: len(tok(text, add_special_tokens=False)["input_ids"])


def _record_text(rec: Record) -> str:
    return "\n".join(t["value"] for t in rec.conversations)


def _balance(values: list[int | float]) -> dict:
    lo, hi = min(values), max(values)
    return {"min": lo, "max": hi, "max_over_min": (hi / lo) if lo else math.inf}


def build_report(records: list[Record], labels: np.ndarray, items: Items, k: int,
                 token_label: str, count_tokens, left_out: list[FailedImage] = ()) -> dict:
    """Per-cluster counts (unique items, image-text pairs, text-only, tokens, source, task)
    of the records in the shards, and the records left out (file, line, id, image, reason)."""
    clusters = []
    item_labels = np.full(len(items.keys), -1)
    has_item = items.record_item >= 0
    item_labels[items.record_item[has_item]] = labels[has_item]
    tokens = np.array([count_tokens(_record_text(r)) for r in records], dtype=np.int64)
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        recs = [records[i] for i in idx]
        clusters.append({
            "cluster": c,
            "records": len(idx),
            "unique_items": int((item_labels == c).sum()),
            "image_text_pairs": sum(r.has_image for r in recs),
            "text_only": sum(not r.has_image for r in recs),
            "tokens": int(tokens[idx].sum()),
            "by_source": dict(sorted(Counter(r.source for r in recs).items())),
            "by_task": dict(sorted(Counter(f"{r.source}/{r.task}" for r in recs).items())),
        })
    return {
        "token_unit": token_label,
        "clusters": clusters,
        "balance": {name: _balance([c[name] for c in clusters])
                    for name in ("unique_items", "records", "image_text_pairs", "tokens")},
        "totals": {"records": len(records), "unique_items": len(items.keys),
                   "image_text_pairs": sum(r.has_image for r in records),
                   "text_only": sum(not r.has_image for r in records),
                   "tokens": int(tokens.sum()), "left_out": len(left_out),
                   "input_records": len(records) + len(left_out)},
        "left_out": [f.to_json() for f in left_out],
    }


def report_markdown(report: dict) -> str:
    """report.json as a readable page."""
    t = report["totals"]
    lines = [f"# Partition into K = {report['k']} clusters", "",
             f"data: `{report['data']}`  features: `{report['features']}` ({report['encoder']}, "
             f"{report['modality']})  algorithm: {report['algorithm']['name']}  seed: {report['seed']}", "",
             f"{t['records']} records in the shards, {t['unique_items']} unique items, {t['image_text_pairs']} "
             f"image-text pairs, {t['text_only']} text-only; {t['left_out']} record(s) left out because their "
             f"image failed (listed below); token unit: {report['token_unit']}.", "",
             "| cluster | unique items | records | image-text pairs | text-only | tokens | share π_k |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c, share in zip(report["clusters"], report["cluster_shares"]):
        lines.append(f"| {c['cluster']} | {c['unique_items']} | {c['records']} | {c['image_text_pairs']} | "
                     f"{c['text_only']} | {c['tokens']} | {share:.4f} |")
    lines += ["", "| balance | min | max | max/min |", "| --- | --- | --- | --- |"]
    for name, b in report["balance"].items():
        lines.append(f"| {name} | {b['min']} | {b['max']} | {b['max_over_min']:.4f} |")
    lines += ["", "## Make-up of each cluster (source/task: records)", ""]
    for c in report["clusters"]:
        lines.append(f"* cluster {c['cluster']}: " + ", ".join(f"{k} {v}" for k, v in c["by_task"].items()))
    cal = report["temperature"]
    bound = f", at the {cal['at_bound']} bound of {cal['bounds']}" if cal.get("at_bound") else ""
    lines += ["", f"Router temperature τ = {cal['temperature']} ({cal['source']}{bound}); "
                  f"mean top router weight on the training features {cal.get('mean_top_weight', float('nan')):.3f}.",
              "", "Timing (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["seconds"].items()), ""]
    return "\n".join(lines + _left_out_markdown(report["left_out"]))


def _left_out_markdown(left_out: list[dict], shown: int = 200) -> list[str]:
    if not left_out:
        return []
    lines = [f"## {len(left_out)} record(s) left out: their image failed", "",
             "Not in any shard: not trained on, not counted above.", "",
             "| file:line | record | reason |", "| --- | --- | --- |"]

    def cell(x) -> str:  # a '|' in a path or id must not end the table cell
        return str(x).replace("|", "\\|")

    lines += [f"| {cell(e['file'])}:{e['line']} | {cell(e['id'])} | {cell(e['reason'])} |" for e in left_out[:shown]]
    if len(left_out) > shown:
        lines.append(f"| … | {len(left_out) - shown} more | all listed in report.json |")
    return lines + [""]


def plot_partition(path: Path, X: np.ndarray, item_labels: np.ndarray, report: dict, seed: int) -> None:
    """PCA (2-D) of the item features coloured by cluster, and the cluster sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(X), PLOT_SAMPLE, replace=False)) if len(X) > PLOT_SAMPLE else np.arange(len(X))
    Xs = X[idx].astype(np.float64)
    Xs = Xs - Xs.mean(0)
    _, _, vt = np.linalg.svd(Xs, full_matrices=False)
    P = Xs @ vt[:2].T  # (n, 2)
    k = report["k"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    for c in range(k):
        sel = item_labels[idx] == c
        ax1.scatter(P[sel, 0], P[sel, 1], s=4, color=cmap(c % cmap.N), label=f"cluster {c}")
    ax1.set(title=f"features (PCA), coloured by cluster, n={len(idx)}", xlabel="PC 1", ylabel="PC 2")
    if k <= 20:
        ax1.legend(markerscale=3, fontsize="small")
    xs = np.arange(k)
    ax2.bar(xs - 0.2, [c["unique_items"] for c in report["clusters"]], width=0.4, label="unique items")
    ax2.bar(xs + 0.2, [c["records"] for c in report["clusters"]], width=0.4, label="records")
    ax2.set(title="cluster sizes", xlabel="cluster", xticks=xs)
    ax2.legend()
    save_figure(fig, path, dpi=100)


# ----------------------------------------------------------------------- stage
def write_router(out: Path, centroids: np.ndarray, router: dict) -> None:
    """router.safetensors (tensor ``centroids`` (K, D) float32) + router.json."""
    from safetensors.numpy import save_file

    with atomic_path(out / "router.safetensors", suffix=".safetensors") as tmp:
        save_file({"centroids": np.ascontiguousarray(centroids, dtype=np.float32)}, str(tmp))
    write_json(out / "router.json", router)


def write_shards(out: Path, records: list[Record], labels: np.ndarray, k: int) -> list[Path]:
    """shard-XX.jsonl per cluster, records in input order; stale shards of a larger K removed."""
    width = max(2, len(str(k - 1)))
    paths = [out / f"shard-{c:0{width}d}.jsonl" for c in range(k)]
    for c, path in enumerate(paths):
        write_records(path, [records[i] for i in np.flatnonzero(labels == c)])
    keep = {p.name for p in paths}
    for stale in out.iterdir():
        if SHARD_RE.match(stale.name) and stale.name not in keep:
            stale.unlink()
    return paths


def partition(cfg: PartitionConfig) -> Path:
    """Split ``cfg.data`` into K shards by balanced k-means of its features; returns the out dir."""
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    token_label, count_tokens = _token_counter(cfg.tokenizer)  # fail early, before any output
    records, left_out, items, X, meta = _load_items(cfg)
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model = _fit(cfg, X)
    seconds["fit"] = time.perf_counter() - t0
    item_labels = model.labels_
    labels = record_labels(items, item_labels, cfg.k, cfg.seed)
    centroids = model.cluster_centers_
    if cfg.temperature is None:
        calibration = {**calibrate_temperature(X, centroids, item_labels, seed=cfg.seed), "source": "calibrated"}
    else:
        calibration = {"temperature": float(cfg.temperature), "source": "given (--temperature)"}
    shares = (np.bincount(labels, minlength=cfg.k) / len(records)).tolist()
    algorithm = _algorithm_record(cfg, model)

    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(out, records, labels, cfg.k)
    write_router(out, centroids, {
        "k": cfg.k, "temperature": calibration["temperature"], "top_k": 1,
        "encoder": meta.get("encoder"), "modality": meta["modality"], "dim": int(centroids.shape[1]),
        "centroids": "router.safetensors", "cluster_shares": shares, "algorithm": algorithm,
        "temperature_calibration": calibration, "shards": [p.name for p in shards]})
    seconds["write"] = time.perf_counter() - t0

    report = {"k": cfg.k, "data": str(cfg.data), "features": str(cfg.features), "encoder": meta.get("encoder"),
              "modality": meta["modality"], "seed": cfg.seed, "config": to_dict(cfg), "algorithm": algorithm,
              "fit_info": model.fit_info_, "cluster_shares": shares, "temperature": calibration,
              "seconds": seconds,
              **build_report(records, labels, items, cfg.k, token_label, count_tokens, left_out)}
    if cfg.plot:
        plot_partition(out / "partition.png", X, item_labels, report, cfg.seed)
        report["plot"] = "partition.png"
    write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", report_markdown(report))
    log.info("partition: wrote %d shards, router and report to %s", cfg.k, out)
    return out


def _load_items(cfg: PartitionConfig):
    """The records (failed images left out), their unique items and the items' features (U, D)."""
    feats, keys, meta = _features(cfg.features)
    records = load_records(cfg.data, check_images=False).records
    records, left_out = leave_out_failed_images(records, keys, meta)
    log_failed_images("partition", left_out, f"{cfg.out}/report.json")
    items = map_items(records, keys, meta, cfg.features)
    if len(items.keys) < cfg.k:
        raise ValueError(f"k={cfg.k} is larger than the number of unique items with features "
                         f"({len(items.keys)}) in {cfg.data}")
    X = item_features(feats, items.rows)  # (U, D)
    log.info("partition: %d records, %d unique %s items, %d text-only without a row; fitting %s k-means, K=%d",
             len(records), len(X), meta["modality"], int((items.record_item < 0).sum()), cfg.algorithm, cfg.k)
    return records, left_out, items, X, meta


def _fit(cfg: PartitionConfig, X: np.ndarray):
    """The fitted k-means estimator of ``cfg`` on the items' features ``X`` (U, D)."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():  # X may be the read-only memory map: k-means only reads it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        model = make_model(cfg).fit(X)
    log.info("partition: %d iterations in %.1f s, unique items per cluster %s", model.n_iter_,
             time.perf_counter() - t0, np.bincount(model.labels_, minlength=cfg.k).tolist())
    if "n_fine" in model.fit_info_ and model.fit_info_["n_fine"] < cfg.fine_clusters:
        log.info("partition: two-stage used m = min(--fine-clusters, max(k, N // %d)) = %d fine clusters for "
                 "N = %d items (k-means needs at least %d points per fine cluster to train one)", model.min_fine_size,
                 model.fit_info_["n_fine"], len(X), model.min_fine_size)
    return model


def record_labels(items, item_labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster of every record (R,): its item's, or, for a record without an item (text-only
    under an image encoder), spread randomly and equally over the K clusters (paper §5.1)."""
    labels = np.empty(len(items.record_item), dtype=np.int64)
    has = items.record_item >= 0
    labels[has] = item_labels[items.record_item[has]]
    labels[~has] = spread_free(int((~has).sum()), k, seed)
    return labels


def _algorithm_record(cfg: PartitionConfig, model) -> dict:
    """router.json's ``algorithm``: the estimator's parameters, iterations and objective."""
    algorithm = {"name": cfg.algorithm, **model.get_params(), "n_iter": int(model.n_iter_),
                 "inertia": float(model.inertia_)}
    if "n_fine" in model.fit_info_:  # two-stage: the fine clusters m it used (adapted to the data)
        algorithm["n_fine_used"] = int(model.fit_info_["n_fine"])
    return algorithm
