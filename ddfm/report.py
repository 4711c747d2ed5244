"""REPORT.md and its PNG plots for ``ddfm demo`` and ``ddfm ablate``.

Tables follow the paper's layout (Tables 2–6): one row per task, the dense baseline and
the ensemble side by side with their difference, the chance level beside each task; then
the compute of every run (steps, batch, samples, tokens, wall time). Plots (matplotlib,
Agg): the partition (2-D projection by cluster + cluster sizes, from ``ddfm partition``),
training loss curves of every run, and accuracy (or perplexity) per task, dense vs ensemble.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from ddfm.data import load_records
from ddfm.io import atomic_write_text, read_json, save_figure
from ddfm.runtime.provenance import provenance_lines
from ddfm.vqa import exact_match, normalize_answer

__all__ = ["write_report", "comparison_table", "compute_table", "plot_losses", "plot_tasks", "fmt"]


def fmt(x: float | None, pct: bool = False, signed: bool = False) -> str:
    """A table cell: percentage with one decimal (``pct``), 3 significant decimals otherwise."""
    if x is None:
        return "–"
    v = 100 * x if pct else x
    spec = ".1f" if (pct or abs(v) >= 10) else ".3f"
    return f"{v:{'+' if signed else ''}{spec}}"


def _metric(group: dict, metric: str) -> float | None:
    return group.get(metric)


def comparison_table(evals: dict[str, dict], chance: dict[str, float], metric: str, *,
                     tasks: list[str] | None = None) -> str:
    """Markdown: rows = tasks (+ overall), columns = chance, dense, each ensemble, Δ vs dense.

    ``evals``: name -> eval.json (``"dense"`` first); ``metric``: "accuracy" or "perplexity".
    """
    pct = metric == "accuracy"
    names = list(evals)
    dense = evals.get("dense")
    all_tasks = tasks or sorted({t for e in evals.values() for t, g in e["by_task"].items()
                                 if g.get(metric) is not None})
    head = ["task", "chance"] + [n for n in names] + [f"Δ {n}" for n in names if n != "dense" and dense]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]

    def row(label: str, groups: dict[str, dict | None], ch: float | None) -> str:
        vals = {n: (_metric(g, metric) if g else None) for n, g in groups.items()}
        cells = [label, fmt(ch, pct) if pct else "–"] + [fmt(vals[n], pct) for n in names]
        if dense:
            for n in names:
                if n != "dense":
                    d = None if vals[n] is None or vals["dense"] is None else vals[n] - vals["dense"]
                    cells.append(fmt(d, pct, signed=True))
        return "| " + " | ".join(cells) + " |"

    for t in all_tasks:
        lines.append(row(t, {n: e["by_task"].get(t) for n, e in evals.items()}, chance.get(t)))
    lines.append(row("**overall**", {n: e["overall"] for n, e in evals.items()}, None))
    return "\n".join(lines)


def run_compute(run_dir: Path) -> dict[str, Any]:
    """Compute of one training run from its ``ddfm.json`` and stage marker."""
    meta = read_json(run_dir / "ddfm.json")
    c = meta["compute"]
    done = run_dir / "DONE.json"
    wall = read_json(done)["elapsed_s"] if done.is_file() else c.get("elapsed_s")
    return {"steps": c["steps"], "batch_size": c["batch_size"], "samples": c["samples_seen"],
            "tokens": c["tokens_seen"], "answer_tokens": c["loss_tokens_seen"], "epochs": c["epochs"],
            "wall_s": wall, "examples": meta.get("examples")}


# What each demo run stands for in the paper (§5): its experts start from a checkpoint after
# the vision-language alignment stage (LLaVA-1.5-7B; InternVL-2.5-1B after stage 1.5) and
# only the (visual) instruction tuning stage is decentralised.
PAPER_STAGES = {
    "pretrain": "LLM pretraining (the paper's LLaVA and InternVL start from a pretrained LLM)",
    "align": "vision-language alignment: the experts' shared initial checkpoint (LLaVA-1.5 stage 1, "
             "InternVL stage 1.5)",
    "align-text": "a shared language warm-up before the split: the experts' initial checkpoint",
    "dense": "instruction tuning, centralised: the dense baseline",
    "expert": "instruction tuning of {run} on cluster {k} only (decentralised)",
}


def paper_stage(name: str, text: bool = False) -> str:
    """The paper's stage a demo run stands for (:data:`PAPER_STAGES`)."""
    if name.startswith("expert"):
        return PAPER_STAGES["expert"].format(run=name, k=name.split("-")[-1])
    return PAPER_STAGES["align-text" if text and name == "align" else name]


def compute_table(runs: dict[str, Path], text: bool = False) -> str:
    """Markdown: the compute of every training run (the experts' sum last), with the paper's
    stage each stands for; ``text``: a language-only demo (its align is a language warm-up)."""
    lines = ["| run | the paper's stage | steps | batch | samples | tokens | answer tokens | epochs | wall time s |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    experts = {"steps": 0, "samples": 0, "tokens": 0, "answer_tokens": 0, "wall_s": 0.0}
    n_exp = 0
    for name, d in runs.items():
        c = run_compute(d)
        lines.append(f"| {name} | {paper_stage(name, text)} | {c['steps']} | {c['batch_size']} | {c['samples']} | "
                     f"{c['tokens']} | {c['answer_tokens']} | {c['epochs']:.2f} | {c['wall_s']:.0f} |")
        if name.startswith("expert"):
            n_exp += 1
            for k in experts:
                experts[k] += c[k] if k != "steps" else 0
    if n_exp:
        lines.append(f"| experts (sum of {n_exp}) | – | – | – | {experts['samples']} | {experts['tokens']} | "
                     f"{experts['answer_tokens']} | – | {experts['wall_s']:.0f} |")
    return "\n".join(lines)


def _log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines() if line.strip()]


def _loss_curve(run_dir: Path) -> tuple[list[int], list[float]]:
    rows = [r for r in _log_rows(run_dir) if "loss" in r]
    batch = read_json(run_dir / "ddfm.json")["compute"]["batch_size"]
    return [r["step"] * batch for r in rows], [r["loss"] for r in rows]


def _smooth(y: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(y):
        acc = v if i == 0 else 0.9 * acc + 0.1 * v if n > 20 else v
        out.append(acc)
    return out


def plot_losses(path: Path, runs: dict[str, Path]) -> None:
    """Training loss (EMA-smoothed) against samples seen, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    offset = 0
    for name, d in runs.items():
        x, y = _loss_curve(d)
        ax.plot([offset + v for v in x], _smooth(y, len(y)), label=name, lw=1.4)
        if name in ("pretrain", "align"):  # the next stage continues from this checkpoint
            offset += x[-1]
    ax.set_xlabel("samples seen (dense and experts after the base stages)")
    ax.set_ylabel("training loss (answer tokens, nats)")
    ax.set_title("training loss of every run")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def held_out_curves(runs: dict[str, Path]) -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Held-out answer loss over training (``log.jsonl`` eval_loss): run -> file -> (steps, losses)."""
    out: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for name, d in runs.items():
        for r in _log_rows(d):
            for f, v in (r.get("eval_loss") or {}).items():
                steps, losses = out.setdefault(name, {}).setdefault(f, ([], []))
                steps.append(r["step"])
                losses.append(v)
    return out


def plot_held_out(path: Path, runs: dict[str, Path], k: int) -> bool:
    """One panel per cluster: the held-out loss of dense and of the cluster's expert on that
    cluster's val records, against training steps (the same steps for both). False if none logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = held_out_curves(runs)
    if "dense" not in curves:
        return False
    fig, axes = plt.subplots(1, k, figsize=(4.2 * k, 3.6), squeeze=False)
    for j, ax in enumerate(axes[0]):
        f = f"cluster-{j}"
        for name, style in (("dense", "k-"), (f"expert-{j}", "C1-")):
            if f in curves.get(name, {}):
                x, y = curves[name][f]
                ax.plot(x, y, style, marker="o", ms=3, label=name)
        ax.set(title=f"cluster {j}: held-out val records", xlabel="training step", ylabel="answer loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend()
    save_figure(fig, path)
    return True


def router_only_baseline(shards: list[Path], predictions: list[dict]) -> dict[str, Any]:
    """Accuracy of answering every test item with its cluster's most common training answer
    for its task (no model at all): how much of a score the clustering alone gives.

    shards: the partition's shard files (cluster k = shards[k]); predictions: eval rows with
    ``task``, ``cluster`` (the cluster the item's features route to), ``reference``,
    ``correct`` (None for perplexity-only rows). Returns ``{"by_task": {task: acc}, "overall": acc}``.
    """
    from collections import Counter, defaultdict

    majority: dict[tuple[str, str], str] = {}
    for k, shard in enumerate(shards):
        answers: dict[str, Counter] = defaultdict(Counter)
        for r in load_records(shard, check_images=False).records:
            answers[r.task][normalize_answer(r.answer())] += 1
        majority.update({(str(k), t): c.most_common(1)[0][0] for t, c in answers.items()})
    hits: dict[str, list[bool]] = defaultdict(list)
    for row in predictions:
        if row.get("correct") is None:
            continue
        guess = majority.get((str(row["cluster"]), row["task"]))
        hits[row["task"]].append(guess is not None and exact_match(guess, row["reference"]))
    every = [h for v in hits.values() for h in v]
    return {"by_task": {t: sum(v) / len(v) for t, v in sorted(hits.items())},
            "overall": sum(every) / len(every) if every else None}


def route_disagreement(predictions: list[dict]) -> float | None:
    """Share of test items whose ensemble route (argmax of the final weights) is not the
    cluster their own features fall in (nearest centroid, eq. 29's argmax)."""
    rows = [r for r in predictions if r.get("weights") and str(r.get("cluster")).isdigit()]
    if not rows:
        return None
    return sum(max(range(len(r["weights"])), key=r["weights"].__getitem__) != int(r["cluster"]) for r in rows) / len(rows)


def answers_that_differ(a: list[dict], b: list[dict]) -> int:
    """How many records two evaluations of the same test file answered differently."""
    by_id = {r["id"]: r["prediction"] for r in b}
    return sum(r["prediction"] != by_id.get(r["id"]) for r in a)


def top_weights(predictions: list[dict]) -> list[float]:
    """Each record's largest final router weight (1.0: one expert had all the weight)."""
    return [max(r["weights"]) for r in predictions if r.get("weights")]


def _read_predictions(eval_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines() if line.strip()]


def diagnostics_section(p, names: dict, evals: dict[str, dict], metric: str) -> list[str]:
    """Where the gap between dense and the experts comes from (per cluster, K x K, router only)."""
    if metric != "accuracy":
        return []
    k = len(names["experts"])
    shards = [p.path(names["partition"]) / f"shard-{j:02d}.jsonl" for j in range(k)]
    preds = {n: _read_predictions(d) for n, d in names["evals"].items()}
    base = router_only_baseline(shards, preds["dense"])
    lines = ["## Where the gap comes from", "",
             "**Per cluster**: dense vs the routed expert on the test items whose features fall in each "
             "cluster (top-1 sends each of them to that cluster's expert).", "",
             "| cluster | items | dense | top-1 (the cluster's expert) | Δ |", "| --- | ---: | ---: | ---: | ---: |"]
    for c, g in evals["dense"]["by_cluster"].items():
        if not g.get("n_qa"):
            continue
        e = (evals.get("top-1") or {}).get("by_cluster", {}).get(c) or {}
        d = None if e.get("accuracy") is None or g.get("accuracy") is None else e["accuracy"] - g["accuracy"]
        lines.append(f"| {c} | {g['n_qa']} | {fmt(g.get('accuracy'), True)} | {fmt(e.get('accuracy'), True)} | "
                     f"{fmt(d, True, signed=True)} |")
    lines += ["", "**Router only**: each test item answered with its cluster's most common training answer "
              "for its task — no model. A routed ensemble gets this much from the clustering alone.", "",
              "| task | chance | router only | dense | top-1 |", "| --- | ---: | ---: | ---: | ---: |"]
    chance = evals["dense"].get("chance", {})
    for t, acc in base["by_task"].items():
        lines.append(f"| {t} | {fmt(chance.get(t), True)} | {fmt(acc, True)} | "
                     f"{fmt(evals['dense']['by_task'][t]['accuracy'], True)} | "
                     f"{fmt(((evals.get('top-1') or {}).get('by_task', {}).get(t) or {}).get('accuracy'), True)} |")
    lines.append(f"| **overall** | – | {fmt(base['overall'], True)} | {fmt(evals['dense']['overall']['accuracy'], True)} | "
                 f"{fmt(((evals.get('top-1') or {}).get('overall') or {}).get('accuracy'), True)} |")
    lines += ["", "**Routes that leave the feature cluster**: the share of test items whose ensemble route "
              "(argmax of its final weights) differs from the cluster its own features fall in.", "",
              "| routing | items routed elsewhere |", "| --- | ---: |"]
    for n in evals:
        if n != "dense":
            lines.append(f"| {n} | {fmt(route_disagreement(preds[n]), True)} % |")
    routings = [n for n in evals if n != "dense"]
    lines += ["", "**Columns that agree**: answers that differ between two routings (0: the columns agree on "
              "every record, whatever their scores say), and how close to one-hot each routing's final weights "
              "are.", "", "| routing | " + " | ".join(f"differs from {n}" for n in routings)
              + " | median top weight | records with top weight < 0.9 |", "| --- |" + " ---: |" * (len(routings) + 2)]
    for n in routings:
        tops = top_weights(preds[n])
        median = f"{statistics.median(tops):.4f}" if tops else "–"
        lines.append(f"| {n} | " + " | ".join("–" if m == n else str(answers_that_differ(preds[n], preds[m]))
                                              for m in routings)
                     + f" | {median} | {sum(t < 0.9 for t in tops)} |")
    return lines + [""]


def plot_tasks(path: Path, evals: dict[str, dict], chance: dict[str, float], metric: str) -> None:
    """Grouped bars per task: the metric of dense and each ensemble, chance as a tick."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({t for e in evals.values() for t, g in e["by_task"].items() if g.get(metric) is not None})
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(tasks) + 2), 4.2))
    width = 0.8 / max(len(evals), 1)
    x = np.arange(len(tasks))
    scale = 100 if metric == "accuracy" else 1
    for i, (name, e) in enumerate(evals.items()):
        vals = [(e["by_task"].get(t, {}).get(metric) or 0) * scale for t in tasks]
        ax.bar(x + (i - (len(evals) - 1) / 2) * width, vals, width, label=name)
    if metric == "accuracy":
        for j, t in enumerate(tasks):
            if t in chance:
                ax.hlines(100 * chance[t], j - 0.45, j + 0.45, colors="k", linestyles="dashed", lw=1,
                          label="chance" if j == 0 else None)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy %" if metric == "accuracy" else metric)
    ax.set_title(f"{metric} per task: dense vs ensemble")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def _partition_section(part_dir: Path) -> list[str]:
    rep = read_json(part_dir / "report.json")
    lines = [f"Encoder `{rep.get('encoder')}`, {rep['algorithm']['name']} k-means, K={rep['k']}, "
             f"router temperature τ={rep['temperature']['temperature']:.2f} ({rep['temperature']['source']}).", ""]
    clusters = rep.get("clusters") or []
    if clusters:
        keys = [k for k in ("records", "unique_items", "image_text_pairs", "text_only", "tokens") if k in clusters[0]]
        lines += ["| cluster | " + " | ".join(keys) + " | largest tasks |",
                  "| --- |" + " ---: |" * len(keys) + " --- |"]
        for i, c in enumerate(clusters):
            tasks = c.get("by_task") or {}
            top = ", ".join(f"{t} {n}" for t, n in sorted(tasks.items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"| {i} | " + " | ".join(str(c.get(k)) for k in keys) + f" | {top} |")
    return lines


def write_report(p, preset: dict, names: dict, *, title: str, command: str, this_run_s: float) -> Path:
    """Write ``REPORT.md``, ``loss.png``, ``tasks.png`` and ``partition.png`` in the run directory."""
    root: Path = p.root
    evals = {name: read_json(d / "eval.json") for name, d in names["evals"].items()}
    metric = preset["metric"]
    chance = evals["dense"].get("chance", {})
    base_runs = {n: p.path(n) for n in ("pretrain", "align") if (p.path(n) / "ddfm.json").is_file()}
    runs = {**base_runs, "dense": p.path("dense"), **{e: p.path(e) for e in names["experts"]}}
    plot_losses(root / "loss.png", runs)
    held_out = plot_held_out(root / "held_out.png", runs, len(names["experts"]))
    plot_tasks(root / "tasks.png", evals, chance, metric)
    part_png = p.path(names["partition"]) / "partition.png"
    if part_png.is_file():
        shutil.copyfile(part_png, root / "partition.png")
    stage_time = sum(read_json(f)["elapsed_s"] for f in root.glob("*/DONE.json"))
    prep = read_json(p.path("data") / "prepare.json")
    counts = prep["counts"]
    main_label = "Accuracy % (VQA-normalised exact match)" if metric == "accuracy" else "Perplexity of the reference text"
    lines = [f"# {title}", "",
             f"Command: `{command}` — seed {p.seed}. Stage wall time (sum of all stages, measured when each "
             f"ran): {stage_time:.0f} s; this invocation: {this_run_s:.0f} s.", "",
             f"## {main_label}: dense baseline vs {preset['k']} experts", "",
             comparison_table(evals, chance, metric), "",
             "Dense: one model trained on all data. Experts: K models from the same aligned base, "
             "each on its own cluster, compute-matched (same steps at batch/K). Routing: "
             "top-1 = centroid router of eq. 29, top-1 (the paper's setting); soft = eq. 29 weights over all "
             "experts, mixed per token in probability space (eq. 24); posterior = the exact router (eq. 26–27) with "
             "every prompt token as evidence; posterior-answers = the same with only answer tokens as evidence "
             "(the experts never learn to predict the question). "
             "Δ = ensemble − dense. Chance = accuracy of always giving the train split's majority answer.", ""]
    if metric == "accuracy":
        lines += ["## Perplexity of the reference answers", "", comparison_table(evals, {}, "perplexity"), ""]
    lines += ["## Per cluster (records grouped by the cluster their image, or text, routes to)", "",
              comparison_table({n: {"by_task": e["by_cluster"], "overall": e["overall"]} for n, e in evals.items()},
                               {}, metric).replace("| task |", "| cluster |", 1), "",
              *diagnostics_section(p, names, evals, metric),
              *(["![held-out loss](held_out.png)", "",
                 "Held-out answer loss on each cluster's val records (images never trained on), dense vs the "
                 "cluster's expert, at the same training steps.", ""] if held_out else []),
              "## Compute of every run", "", compute_table(runs, text=metric != "accuracy"), "",
              "## Data", "",
              f"Train {counts['train']['records']} records ({counts['train']['images']} images, "
              f"{counts['train']['text_only']} text-only); test {counts['test']['records']} records "
              f"({counts['test']['images']} images, {counts['test']['text_only']} text-only); "
              f"evaluated: {evals['dense']['n_records']} test records.", "",
              "## Partition", "", *_partition_section(p.path(names["partition"])), "",
              "## Plots", "",
              "![partition](partition.png)", "", "![training loss](loss.png)", "", "![per task](tasks.png)", "",
              "## Provenance", "", "What produced these numbers (the same command, lock and thread count on the "
              "same machine print the same tables):", "", *provenance_lines(), ""]
    report = root / "REPORT.md"
    atomic_write_text(report, "\n".join(lines))
    return report
