"""The paper's ablations on the demo data in one command (paper Tables 7–9).

    ddfm ablate                        # reuses runs/demo (data, aligned base, dense baseline)
    ddfm ablate --groups K routing     # only some groups
    ddfm ablate --quick --out /tmp/d   # toy sizes (tests)

Each row changes one setting of the demo's ensemble (K=2, its encoder, balanced k-means,
top-1 centroid routing) and trains fresh compute-matched experts when the partition
changes:

    K           2, 4                                          (Table 7: number of experts)
    encoder     efficientnet-lite0, pixels, the experts' own vision tower ("tower:" the
                aligned base; the paper's zero-overhead shared encoder)   (Table 8)
    clustering  balanced, two-stage (fine unbalanced k-means, then balanced)  (Table 9)
    routing     top-1, soft (eq. 29 over all experts), posterior (eq. 26–27; evidence: the
                prompt, or only answer tokens)

Beyond the paper's tables, the groups that explain the gap between dense and experts
(:data:`STUDIES`):

    diagnostics every expert alone on every cluster's test items (the K×K matrix), and the
                dense baseline trained at the experts' batch B/K for the same steps (batch vs
                partition)
    scale-data  the dense − top-1 gap as the unique images per expert grow: fractions of the
                training images, one pass each
    scale-base  the gap as the shared base grows: fractions of the alignment stage's steps
                (0 = the experts start from the pretrained LM, or from init)
    seeds       the whole demo again at other seeds: the spread of the headline row
    loss        the experts retrained with the loss on every token of the conversation
                (``--loss-on all``) against the demo's (answers only), each under top-1,
                soft and the exact posterior routers: does the posterior, which scores
                the experts on the prompt, catch up with top-1 once they model it?

Every stage runs through :class:`~ddfm.pipeline.Pipeline`, as the demo's do, so finished stages
(the demo's own and earlier ablation rows) are never redone. Output: ``OUT/ablate/``
``ABLATE.md`` (one table, one row per setting, dense first), ``ablate.json`` and
``ablate.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ddfm.config import arg
from ddfm.data import load_records, write_records
from ddfm.demo import PRESETS, resolve_preset, run_core
from ddfm.io import atomic_write_text, read_json, save_figure, write_json
from ddfm.pipeline import (
    Pipeline,
    base_start,
    slug,
    stage_base_step,
    stage_dense,
    stage_eval,
    stage_experts,
    stage_partition,
)
from ddfm.report import fmt
from ddfm.routing import ROUTINGS
from ddfm.runtime.device import DEVICE_HELP, check_device
from ddfm.runtime.provenance import provenance, provenance_lines

log = logging.getLogger(__name__)

__all__ = ["AblateConfig", "ablate", "ABLATIONS", "variants"]

# group -> the settings of its rows (each overrides the demo's baseline ensemble)
ABLATIONS: dict[str, list[dict[str, Any]]] = {
    "K": [{"k": 2}, {"k": 4}],
    "encoder": [{"encoder": "efficientnet-lite0"}, {"encoder": "pixels"}, {"encoder": "tower"}],
    "clustering": [{"algorithm": "balanced"}, {"algorithm": "two-stage"}],
    "routing": [{"routing": "top-1"}, {"routing": "soft"}, {"routing": "posterior"},
                {"routing": "posterior-answers"}],
}


# the studies (their sizes are the preset's "studies" entry): name -> runner
STUDIES = ("diagnostics", "scale-data", "scale-base", "seeds", "loss")
GROUPS = (*ABLATIONS, *STUDIES)


def variants(preset: dict, groups: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(group, full setting) rows: the baseline ``{encoder, k, algorithm, routing}`` updated
    by each row of each group."""
    base = {"encoder": preset["encoder"], "k": preset["k"], "algorithm": preset["algorithm"], "routing": "top-1"}
    return [(g, {**base, **row}) for g in groups for row in ABLATIONS[g]]


def _encoder_spec(p, name: str) -> str:
    # "tower" = the vision tower of the aligned base the experts start from
    return f"tower:{p.path('align').resolve()}" if name == "tower" else name


def _run_variant(p, preset: dict, setting: dict, demo_names: dict) -> Path:
    same_partition = (setting["encoder"], setting["k"], setting["algorithm"]) == \
        (preset["encoder"], preset["k"], preset["algorithm"])
    if same_partition:  # the demo's own partition, experts and evaluations
        part, experts, prefix = demo_names["partition"], demo_names["experts"], ""
    else:
        prefix = f"ablate/{slug(setting['encoder'])}-k{setting['k']}-{setting['algorithm']}/"
        part = stage_partition(p, preset, encoder=_encoder_spec(p, setting["encoder"]), k=setting["k"],
                               algorithm=setting["algorithm"], prefix=prefix)
        experts = stage_experts(p, preset, part, setting["k"], prefix=prefix)
    routing = setting["routing"]
    return stage_eval(p, preset, f"{prefix}eval-{routing}", experts, part, ROUTINGS[routing])


def _label(group: str, setting: dict) -> str:
    key = {"K": "k", "encoder": "encoder", "clustering": "algorithm", "routing": "routing"}[group]
    return f"K={setting['k']}" if key == "k" else str(setting[key])


def ablation_table(rows: list[dict], dense: dict, metric: str, chance: dict) -> str:
    """Markdown: dense first, then one row per (group, setting); columns = tasks, overall, Δ."""
    pct = metric == "accuracy"
    tasks = sorted(t for t, g in dense["by_task"].items() if g.get(metric) is not None)
    head = ["group", "setting", "K", "encoder", "clustering", "routing", *tasks, "overall", "Δ vs dense"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- | ---: | --- | --- | --- |" + " ---: |" * (len(tasks) + 2)]
    if pct:
        lines.append("| chance | | | | | | " + " | ".join(fmt(chance.get(t), True) for t in tasks) + " | | |")
    lines.append("| dense | baseline | 1 | – | – | – | " +
                 " | ".join(fmt(dense["by_task"][t][metric], pct) for t in tasks) +
                 f" | {fmt(dense['overall'][metric], pct)} | |")
    for r in rows:
        e, s = r["eval"], r["setting"]
        d = e["overall"][metric] - dense["overall"][metric]
        lines.append(f"| {r['group']} | {r['label']} | {s['k']} | {s['encoder']} | {s['algorithm']} | {s['routing']} | "
                     + " | ".join(fmt((e["by_task"].get(t) or {}).get(metric), pct) for t in tasks)
                     + f" | {fmt(e['overall'][metric], pct)} | {fmt(d, pct, signed=True)} |")
    return "\n".join(lines)


def plot_ablation(path: Path, rows: list[dict], dense: dict, metric: str) -> None:
    """Horizontal bars: the overall metric of every ablation row, dense as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if metric == "accuracy" else 1
    labels = [f"{r['group']}: {r['label']}" for r in rows]
    vals = [r["eval"]["overall"][metric] * scale for r in rows]
    colors = {g: f"C{i}" for i, g in enumerate(dict.fromkeys(r["group"] for r in rows))}
    fig, ax = plt.subplots(figsize=(6.4, 0.4 * len(rows) + 1.5))
    ax.barh(range(len(rows)), vals, color=[colors[r["group"]] for r in rows])
    ax.axvline(dense["overall"][metric] * scale, color="k", ls="--", lw=1, label="dense")
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("overall accuracy %" if metric == "accuracy" else f"overall {metric}")
    ax.set_title("ablations: K, encoder, clustering, routing")
    ax.legend()
    save_figure(fig, path)


@dataclass
class AblateConfig:
    """``ddfm ablate [--out RUN_DIR] [--groups ...] [--quick]``."""

    out: str = arg("the demo's run directory (reused; results in OUT/ablate/)", default="runs/demo")
    preset: str = arg("demo preset", default="image")
    quick: bool = arg("toy sizes (the demo's --quick)", default=False)
    seed: int = arg("seed of every stage", default=0)
    groups: list[str] = arg("ablation groups: " + ", ".join(GROUPS), default_factory=lambda: list(GROUPS))
    threads: Optional[int] = arg("torch threads (default: torch's choice)", default=None)
    device: str = arg(DEVICE_HELP + "; every stage runs on it", default="auto")

    def __post_init__(self):
        check_device(self.device)
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        unknown = [g for g in self.groups if g not in GROUPS]
        if unknown or not self.groups:
            raise ValueError(f"--groups: unknown group(s) {unknown}; choose from {', '.join(GROUPS)}")


def ablate(cfg: AblateConfig) -> Path:
    """Run the demo (cached) and every ablation row; write OUT/ablate/ABLATE.md and return it."""
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = resolve_preset(cfg.preset, cfg.quick)
    groups = [g for g in cfg.groups if g not in preset.get("skip_ablations", ())]
    t0 = time.perf_counter()
    p = Pipeline(cfg.out, cfg.seed, device=cfg.device)
    names = run_core(p, preset)
    metric = preset["metric"]
    dense = read_json(names["evals"]["dense"] / "eval.json")
    rows = []
    for group, setting in variants(preset, [g for g in groups if g in ABLATIONS]):
        log.info("ablate: %s = %s", group, _label(group, setting))
        d = _run_variant(p, preset, setting, names)
        rows.append({"group": group, "label": _label(group, setting), "setting": setting,
                     "eval": read_json(d / "eval.json"), "dir": str(d)})
    out = p.root / "ablate"
    out.mkdir(parents=True, exist_ok=True)
    table = ablation_table(rows, dense, metric, dense.get("chance", {}))
    plot_ablation(out / "ablate.png", rows, dense, metric)
    write_json(out / "ablate.json", {"metric": metric, "dense": dense["overall"],
                                     "rows": [{k: v for k, v in r.items() if k != "eval"} | {"overall": r["eval"]["overall"]}
                                              for r in rows], "provenance": provenance()})
    studies = [g for g in groups if g in STUDIES]
    sections = run_studies(p, preset, names, studies, out) if studies and metric == "accuracy" else []
    report = out / "ABLATE.md"
    atomic_write_text(report, "\n".join([
        f"# ddfm ablate — preset {cfg.preset}" + (" (quick)" if cfg.quick else ""), "",
        f"Run directory `{p.root}`, seed {cfg.seed}; {metric} on the demo's test set. Each row changes one "
        "setting of the baseline ensemble (first row of each group = the demo's); experts are retrained, "
        "compute-matched to the dense baseline, whenever the partition changes.", "",
        table, "", "![ablations](ablate.png)", "", *sections, "", "## Provenance", "", *provenance_lines(), ""]))
    print(table)
    print(f"\nablate: finished in {time.perf_counter() - t0:.0f} s; report: {report.resolve()}")
    return report


# ------------------------------------------------------------------------------ studies

def _acc(e: dict | None, key: str = "overall") -> float | None:
    return None if e is None else (e[key] if key == "overall" else e).get("accuracy")


def _eval(d: Path) -> dict:
    return read_json(d / "eval.json")


def run_studies(p, preset: dict, names: dict, studies: list[str], out: Path) -> list[str]:
    """Run the requested studies; returns the markdown sections of ABLATE.md (and writes
    ``studies.json`` and ``scale.png``)."""
    results: dict[str, Any] = {}
    lines: list[str] = []
    if "diagnostics" in studies:
        results["diagnostics"] = study_diagnostics(p, preset, names)
        lines += diagnostics_markdown(results["diagnostics"], preset["k"])
    scale = {g: study_scale(p, preset, names, g) for g in ("scale-data", "scale-base") if g in studies}
    if scale:
        results.update(scale)
        lines += scale_markdown(scale)
        plot_scale(out / "scale.png", scale)
        lines += ["![the gap as data and base grow](scale.png)", ""]
    if "seeds" in studies:
        results["seeds"] = study_seeds(p, preset, names)
        lines += seeds_markdown(results["seeds"])
    if "loss" in studies:
        results["loss"] = study_loss(p, preset, names)
        lines += loss_markdown(results["loss"])
    write_json(out / "studies.json", results)
    return lines


def study_diagnostics(p, preset: dict, names: dict) -> dict:
    """Every expert alone on all test items (grouped by the cluster their features fall in),
    and dense at the experts' batch B/K for the same steps."""
    k, part = preset["k"], names["partition"]
    alone = {}
    for j, expert in enumerate(names["experts"]):
        alone[j] = _eval(stage_eval(p, preset, f"ablate/eval-{expert}-alone", [expert], part, None))
    small = stage_dense(p, preset, names.get("val"), name="ablate/dense-batch-over-k", batch_divisor=k)
    small_eval = _eval(stage_eval(p, preset, "ablate/eval-dense-batch-over-k", ["ablate/dense-batch-over-k"],
                                  part, None))
    evals = {n: _eval(d) for n, d in names["evals"].items()}
    return {"matrix": {str(j): {c: g.get("accuracy") for c, g in e["by_cluster"].items() if g.get("n_qa")}
                       for j, e in alone.items()},
            "dense": {"overall": _acc(evals["dense"]), "by_cluster": {c: g.get("accuracy") for c, g in
                                                                      evals["dense"]["by_cluster"].items()}},
            "dense_batch_over_k": {"overall": _acc(small_eval), "dir": str(small),
                                   "by_cluster": {c: g.get("accuracy") for c, g in small_eval["by_cluster"].items()}},
            "top1": {"overall": _acc(evals.get("top-1")),
                     "by_cluster": {c: g.get("accuracy") for c, g in (evals.get("top-1") or {"by_cluster": {}})
                                    ["by_cluster"].items()}}}


def diagnostics_markdown(d: dict, k: int) -> list[str]:
    clusters = sorted({c for row in d["matrix"].values() for c in row}, key=lambda c: (not c.isdigit(), c))
    lines = ["## Diagnostics: where the gap comes from", "",
             "**Every expert on every cluster's test items** (accuracy %; rows: the expert, alone; columns: the "
             "cluster the items' features fall in). The diagonal is what top-1 routing uses.", "",
             "| expert | " + " | ".join(f"cluster {c}" for c in clusters) + " |",
             "| --- |" + " ---: |" * len(clusters)]
    for j, row in d["matrix"].items():
        lines.append(f"| expert-{j} | " + " | ".join(fmt(row.get(c), True) for c in clusters) + " |")
    lines.append("| dense | " + " | ".join(fmt(d["dense"]["by_cluster"].get(c), True) for c in clusters) + " |")
    lines.append(f"| dense at batch B/{k} | " + " | ".join(fmt(d["dense_batch_over_k"]["by_cluster"].get(c), True)
                                                        for c in clusters) + " |")
    dense, small, top1 = d["dense"]["overall"], d["dense_batch_over_k"]["overall"], d["top1"]["overall"]
    lines += ["", f"**Batch vs partition**: dense {fmt(dense, True)}, dense at the experts' batch B/{k} for the same "
              f"steps {fmt(small, True)}, top-1 {fmt(top1, True)}: of the gap {fmt(_diff(dense, top1), True)}, "
              f"{fmt(_diff(dense, small), True)} points go with the batch (each expert's share of the compute) and "
              f"{fmt(_diff(small, top1), True)} with the partition itself.", ""]
    return lines


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def stage_subset(p, fraction: float) -> str:
    """A stage holding ``train.jsonl`` with ``fraction`` of the training images (every record
    of a kept image) and the same fraction of the text records, seeded."""
    import numpy as np

    name = f"ablate/data-{fraction:g}"

    def run(d: Path) -> None:
        records = load_records(p.path("data") / "train.jsonl", check_images=False).records
        rng = np.random.default_rng(p.seed)
        images = sorted({r.image for r in records if r.has_image})
        keep = set(rng.choice(images, max(1, round(fraction * len(images))), replace=False).tolist())
        text = [r.id for r in records if not r.has_image]
        keep |= set(rng.choice(text, round(fraction * len(text)), replace=False).tolist()) if text else set()
        write_records(d / "train.jsonl", [r for r in records if (r.image if r.has_image else r.id) in keep])

    p.run(name, {"fraction": fraction}, run, after=("data",))
    return name


def _gap_point(p, preset: dict, prefix: str, source: str, base: str, part_prefix: str | None = None) -> dict:
    """Dense and K experts on stage ``source``'s records from checkpoint ``base``, evaluated
    (dense, top-1, posterior-answers). The partition of those records is ``part_prefix``'s
    (shared by the points on the same records)."""
    k = preset["k"]
    part = stage_partition(p, preset, encoder=preset["encoder"], k=k, algorithm=preset["algorithm"],
                           prefix=prefix if part_prefix is None else part_prefix, source=source, features="embed")
    dense = stage_dense(p, preset, name=f"{prefix}dense", source=source, base=base)
    experts = stage_experts(p, preset, part, k, prefix=prefix, source=source, base=base)
    evals = {"dense": _eval(stage_eval(p, preset, f"{prefix}eval-dense", [f"{prefix}dense"], part, None))}
    for r in ("top-1", "posterior-answers"):
        evals[r] = _eval(stage_eval(p, preset, f"{prefix}eval-{r}", experts, part, ROUTINGS[r]))
    return {"images_per_expert": _images_per_expert(p, part, k),
            "dense_steps": read_json(dense / "ddfm.json")["compute"]["steps"],
            **{n: _acc(e) for n, e in evals.items()}}


def study_scale(p, preset: dict, names: dict, group: str) -> list[dict]:
    """The gap at each point of a sweep: ``scale-data`` over training-image fractions (one
    pass each, from the demo's base), ``scale-base`` over alignment-step fractions (on the
    preset's ``base_data`` fraction of the images)."""
    study = preset["studies"]
    demo_point = {"images_per_expert": _images_per_expert(p, names["partition"], preset["k"]),
                  "dense_steps": read_json(p.path("dense") / "ddfm.json")["compute"]["steps"],
                  **{n: _acc(_eval(d)) for n, d in names["evals"].items() if n in ("dense", "top-1", "posterior-answers")}}
    points = []
    if group == "scale-data":
        for f in study["data"]:
            point = demo_point if f == 1 else _gap_point(p, preset, f"ablate/data-{f:g}/", stage_subset(p, f), "align")
            points.append({"fraction": f, **point})
        return points
    f = study["base_data"]
    source = "data" if f == 1 else stage_subset(p, f)
    data_prefix = "" if f == 1 else f"ablate/data-{f:g}/"
    align_steps = read_json(p.path("align") / "ddfm.json")["compute"]["steps"]
    for a in study["base"]:
        if a == 1:  # the demo's base: the scale-data point of the same images
            point = demo_point if f == 1 else _gap_point(p, preset, data_prefix, source, "align")
        else:
            base = base_start(preset) if a == 0 else f"ablate/align-{a:g}"
            if a:
                stage_base_step(p, preset["align"], base, base_start(preset), fraction=a)
            point = _gap_point(p, preset, f"{data_prefix}base-{a:g}/", source, base, part_prefix=data_prefix)
        points.append({"align_fraction": a, "align_steps": round(a * align_steps), **point})
    return points


def _images_per_expert(p, part: str, k: int) -> float:
    return sum(c["unique_items"] for c in read_json(p.path(part) / "report.json")["clusters"]) / k


def scale_markdown(scale: dict) -> list[str]:
    lines = ["## The gap as the data and the shared base grow", ""]
    for group, points in scale.items():
        what = ("training images (one pass each)" if group == "scale-data"
                else "alignment steps of the shared base")
        x = "fraction" if group == "scale-data" else "align_steps"
        lines += [f"**{group}** — {what}:", "",
                  f"| {x.replace('_', ' ')} | images per expert | dense steps | dense | top-1 | posterior-answers | "
                  "dense − top-1 | dense − posterior-answers |", "| ---: |" + " ---: |" * 7]
        for pt in points:
            lines.append(f"| {pt[x]:g} | {pt['images_per_expert']:.0f} | {pt['dense_steps']} | {fmt(pt['dense'], True)} | "
                         f"{fmt(pt['top-1'], True)} | {fmt(pt['posterior-answers'], True)} | "
                         f"{fmt(_diff(pt['dense'], pt['top-1']), True, signed=True)} | "
                         f"{fmt(_diff(pt['dense'], pt['posterior-answers']), True, signed=True)} |")
        lines.append("")
    return lines


def plot_scale(path: Path, scale: dict) -> None:
    """The dense − ensemble gap (points) against images per expert and against alignment steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scale), figsize=(5.2 * len(scale), 3.8), squeeze=False)
    for ax, (group, points) in zip(axes[0], scale.items()):
        x = [pt["images_per_expert"] if group == "scale-data" else pt["align_steps"] for pt in points]
        for r, style in (("top-1", "o-"), ("posterior-answers", "s--")):
            ax.plot(x, [100 * _diff(pt["dense"], pt[r]) for pt in points], style, label=f"dense − {r}")
        ax.axhline(0, color="k", lw=0.8)
        ax.set(xlabel="unique training images per expert (one pass)" if group == "scale-data"
               else "alignment steps of the shared base", ylabel="accuracy gap (points)", title=group)
        if group == "scale-data":
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)


LOSS_ROUTINGS = ("top-1", "soft", "posterior", "posterior-answers")


def study_loss(p, preset: dict, names: dict) -> dict:
    """The demo's experts (loss on answers) and experts retrained with the loss on every
    token (``ablate/loss-all/``), each under :data:`LOSS_ROUTINGS`: overall accuracy and
    answer perplexity per routing, per loss."""
    k, part = preset["k"], names["partition"]
    experts = stage_experts(p, preset, part, k, prefix="ablate/loss-all/", train_options={"loss_on": "all"})
    routings = [r for r in LOSS_ROUTINGS if r in names["evals"]]
    evals = {"answers": {r: _eval(names["evals"][r]) for r in routings},
             "all": {r: _eval(stage_eval(p, preset, f"ablate/loss-all/eval-{r}", experts, part, ROUTINGS[r]))
                     for r in routings}}
    dense = _eval(names["evals"]["dense"])["overall"]
    return {"dense": {"accuracy": dense.get("accuracy"), "perplexity": dense.get("perplexity")},
            "experts": {"answers": names["experts"], "all": experts},
            "rows": {loss: {r: {"accuracy": e["overall"].get("accuracy"), "perplexity": e["overall"].get("perplexity")}
                            for r, e in by.items()} for loss, by in evals.items()}}


def loss_markdown(res: dict) -> list[str]:
    routings = list(next(iter(res["rows"].values())))
    lines = ["## The exact posterior router on experts that model the whole conversation", "",
             "Overall accuracy % (answer perplexity) of the K experts' ensemble, the experts trained with the loss "
             "on the answers only (the demo's) or on every token of the conversation but the image "
             "(`--loss-on all`), both compute-matched to the same dense baseline "
             f"({fmt(res['dense']['accuracy'], True)} %, perplexity {fmt(res['dense']['perplexity'])}).", "",
             "| experts' loss | " + " | ".join(routings) + " | posterior − top-1 |",
             "| --- |" + " ---: |" * (len(routings) + 1)]
    for loss, row in res["rows"].items():
        cells = [f"{fmt(row[r]['accuracy'], True)} ({fmt(row[r]['perplexity'])})" for r in routings]
        acc = {r: row.get(r, {}).get("accuracy") for r in ("posterior", "top-1")}
        gap = acc["posterior"] - acc["top-1"] if None not in acc.values() else None
        lines.append(f"| {loss} | " + " | ".join(cells) + f" | {fmt(gap, True, signed=True)} |")
    return lines + [""]


def study_seeds(p, preset: dict, names: dict) -> dict:
    """The whole demo at other seeds (each in ``ablate/seed-S``): the spread of the overall
    row and of every task's row (:func:`seed_summary`)."""
    evals = {p.seed: {n: _eval(d) for n, d in names["evals"].items()}}
    for s in preset["studies"]["seeds"]:
        child = Pipeline(p.root / "ablate" / f"seed-{s}", s, device=p.device)
        evals[s] = {n: _eval(d) for n, d in run_core(child, preset)["evals"].items()}
    return seed_summary(evals)


def seed_summary(evals: dict[int, dict[str, dict]]) -> dict:
    """``{seed: {routing: eval.json}}`` (the dense baseline first) -> per seed the overall
    accuracy of each routing (``runs``) and of each task (``tasks``), and over seeds the
    mean and sample sd of each routing's accuracy and of its gap Δ = routing − dense
    (``summary``; per task: ``task_summary``). Accuracies are fractions in [0, 1]."""
    import statistics

    def spread(vals: list[float]) -> dict[str, float | None]:
        return {"mean": statistics.fmean(vals) if vals else None,
                "sd": statistics.stdev(vals) if len(vals) > 1 else None}

    def stats(per_seed: list[dict[str, float | None]]) -> dict[str, dict]:
        out = {}
        for n in per_seed[0]:
            vals = [r[n] for r in per_seed if r.get(n) is not None]
            gaps = [r[n] - r["dense"] for r in per_seed if n != "dense" and r.get(n) is not None
                    and r.get("dense") is not None]
            g = spread(gaps)
            out[n] = {**spread(vals), "gap_mean": g["mean"], "gap_sd": g["sd"]}
        return out

    runs = {s: {n: _acc(e) for n, e in by_name.items()} for s, by_name in evals.items()}
    tasks = sorted({t for by_name in evals.values() for e in by_name.values() for t, g in e["by_task"].items()
                    if g.get("accuracy") is not None})
    per_task = {s: {t: {n: e["by_task"].get(t, {}).get("accuracy") for n, e in by_name.items()} for t in tasks}
                for s, by_name in evals.items()}
    return {"runs": {str(s): r for s, r in runs.items()},
            "tasks": {str(s): r for s, r in per_task.items()},
            "summary": stats(list(runs.values())),
            "task_summary": {t: stats([per_task[s][t] for s in evals]) for t in tasks}}


def seeds_markdown(seeds: dict) -> list[str]:
    names = list(seeds["summary"])
    head = ["| " + " | ".join(names) + " |", " ---: |" * len(names)]
    lines = [f"## Over {len(seeds['runs'])} seeds (the whole demo at each)", "",
             "Accuracy % overall, each seed, then the mean ± sample sd over seeds, and Δ = routing − "
             "dense (mean ± sd of the per-seed gaps).", "",
             "| seed " + head[0], "| ---: |" + head[1]]
    for s, r in seeds["runs"].items():
        lines.append(f"| {s} | " + " | ".join(fmt(r.get(n), True) for n in names) + " |")
    lines += [_mean_sd_row("mean ± sd", seeds["summary"], names), _gap_row("Δ (− dense)", seeds["summary"], names)]
    if seeds.get("task_summary"):
        lines += ["", f"Each task, mean ± sd over the {len(seeds['runs'])} seeds:", "",
                  "| task " + head[0], "| --- |" + head[1]]
        lines += [_mean_sd_row(t, sm, names) for t, sm in seeds["task_summary"].items()]
    return lines + [""]


def _mean_sd_row(label: str, sm: dict, names: list[str]) -> str:
    return f"| {label} | " + " | ".join(f"{fmt(sm[n]['mean'], True)} ± {fmt(sm[n]['sd'], True)}" for n in names) + " |"


def _gap_row(label: str, sm: dict, names: list[str]) -> str:
    return f"| {label} | – | " + " | ".join(
        f"{fmt(sm[n]['gap_mean'], True, signed=True)} ± {fmt(sm[n]['gap_sd'], True)}" for n in names[1:]) + " |"
