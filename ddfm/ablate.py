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

Every stage runs through the demo's :class:`~ddfm.demo.Pipeline`, so finished stages
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
from ddfm.io import atomic_path, atomic_write_text, read_json, write_json

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


def variants(preset: dict, groups: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """(group, full setting) rows: the baseline ``{encoder, k, algorithm, routing}`` updated
    by each row of each group."""
    base = {"encoder": preset["encoder"], "k": preset["k"], "algorithm": preset["algorithm"], "routing": "top-1"}
    return [(g, {**base, **row}) for g in groups for row in ABLATIONS[g]]


def _encoder_spec(p, name: str) -> str:
    # "tower" = the vision tower of the aligned base the experts start from
    return f"tower:{p.path('align').resolve()}" if name == "tower" else name


def _run_variant(p, preset: dict, setting: dict, demo_names: dict) -> Path:
    from ddfm.demo import ROUTINGS, slug, stage_eval, stage_experts, stage_partition

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
    from ddfm.report import fmt

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
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


@dataclass
class AblateConfig:
    """``ddfm ablate [--out RUN_DIR] [--groups ...] [--quick]``."""

    out: str = arg("the demo's run directory (reused; results in OUT/ablate/)", default="runs/demo")
    preset: str = arg("demo preset", default="image")
    quick: bool = arg("toy sizes (the demo's --quick)", default=False)
    seed: int = arg("seed of every stage", default=0)
    groups: list[str] = arg("ablation groups: " + ", ".join(ABLATIONS), default_factory=lambda: list(ABLATIONS))
    threads: Optional[int] = arg("torch threads (default: torch's choice)", default=None)

    def __post_init__(self):
        from ddfm.demo import PRESETS

        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        unknown = [g for g in self.groups if g not in ABLATIONS]
        if unknown or not self.groups:
            raise ValueError(f"--groups: unknown group(s) {unknown}; choose from {', '.join(ABLATIONS)}")


def ablate(cfg: AblateConfig) -> Path:
    """Run the demo (cached) and every ablation row; write OUT/ablate/ABLATE.md and return it."""
    import torch

    from ddfm.demo import Pipeline, resolve_preset, run_core

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = resolve_preset(cfg.preset, cfg.quick)
    groups = [g for g in cfg.groups if g not in preset.get("skip_ablations", ())]
    t0 = time.perf_counter()
    p = Pipeline(cfg.out, cfg.seed)
    names = run_core(p, preset)
    metric = preset["metric"]
    dense = read_json(names["evals"]["dense"] / "eval.json")
    rows = []
    for group, setting in variants(preset, groups):
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
                                              for r in rows]})
    report = out / "ABLATE.md"
    atomic_write_text(report, "\n".join([
        f"# ddfm ablate — preset {cfg.preset}" + (" (quick)" if cfg.quick else ""), "",
        f"Run directory `{p.root}`, seed {cfg.seed}; {metric} on the demo's test set. Each row changes one "
        "setting of the baseline ensemble (first row of each group = the demo's); experts are retrained, "
        "compute-matched to the dense baseline, whenever the partition changes.", "",
        table, "", "![ablations](ablate.png)", ""]))
    print(table)
    print(f"\nablate: finished in {time.perf_counter() - t0:.0f} s; report: {report.resolve()}")
    return report
