"""The demo: the whole method on the embedded real data, with REPORT.md (paper §4–5).

    ddfm demo                          # image mixture, tiny-llava experts (what `make demo` runs)
    ddfm demo --preset text            # python-docs, minilm encoder, tiny-lm experts, perplexity
    ddfm demo --quick --out /tmp/d     # the same pipeline at toy sizes (< 1 min, for the tests)

Stages, each writing its own subdirectory of the run directory (``--out``, default
``runs/demo``) and a ``DONE.json`` marker when it has finished:

    data        ddfm prepare mix                      real Fashion-MNIST + digits + python-docs
    init        ddfm init --preset tiny-llava         tokenizer + randomly initialised base
    align       ddfm train --train align              short centralised alignment (projector only):
                                                      the experts start from this checkpoint, as the
                                                      paper's start from the aligned LLaVA checkpoint
    embed       ddfm embed --encoder efficientnet-lite0
    partition   ddfm partition --k 2                  balanced spherical k-means, router file
    dense       ddfm train (all data)                 the dense baseline
    expert-k    ddfm train --match dense:S,B,K        expert k on shard k: same steps, batch B/K
    eval-*      ddfm eval                             dense; ensemble top-1 / soft centroid routing
                                                      (eq. 29) and posterior routing (eq. 26–27)
    REPORT.md   tables (dense vs experts per task, chance level, compute) + PNG plots

An interrupted demo resumes where it stopped: a stage whose marker holds the same key
(its configuration and the keys of the stages it reads) is not redone; an interrupted
training stage continues from its resume state (``ddfm train --resume``). The same seed
gives the same numbers. Presets are data (:data:`PRESETS`, :data:`QUICK`).

Python API: ``demo(DemoConfig(out="runs/demo"))`` returns the REPORT.md path.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from ddfm.config import arg
from ddfm.io import read_json, write_json

log = logging.getLogger(__name__)

__all__ = ["DemoConfig", "demo", "PRESETS", "QUICK", "resolve_preset", "Pipeline", "ROUTINGS"]

# Routing settings of the ensemble evaluations: name -> EnsembleConfig options ("soft" mixes
# all K experts with the centroid weights of eq. 29).
ROUTINGS: dict[str, dict[str, Any]] = {
    "top-1": {"mode": "centroid", "top_k": 1},
    "soft": {"mode": "centroid", "top_k": "all"},
    "posterior": {"mode": "posterior", "top_k": "all"},
    # the posterior with only answer tokens as evidence: LLaVA-style experts never learn
    # the human turns, so their probabilities of the question are noise
    "posterior-answers": {"mode": "posterior", "top_k": "all", "evidence": "answers"},
}

# name -> preset (data). Sizes are budgeted for 20 minutes on 2 CPU cores. A training
# stage gives "epochs" (passes over its data; steps = ceil(epochs * records / batch)) or
# "steps"; the experts get the dense run's steps at batch/K (--match).
PRESETS: dict[str, dict[str, Any]] = {
    "image": {
        "help": "the paper's regime: pretrained + aligned base, one pass over 8,000 unique images; "
                "Fashion-MNIST + digits, tiny-llava experts, accuracy",
        "prepare": {"source": "mix", "train_size": 8000, "test_size": 300, "val_size": 200, "align_size": 8000,
                    "pretrain_size": 3000, "text_share": 0.05, "max_words": 24},
        "model": "tiny-llava",
        "encoder": "efficientnet-lite0",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        # the base every run starts from, as LLaVA's: a language model pretrained on text,
        # then aligned to the vision tower on image-caption pairs (the tiny tower starts
        # random, where the paper's CLIP is pretrained, so alignment trains it too)
        "pretrain": {"data": "pretrain", "train": "language", "epochs": 1, "batch_size": 16, "lr": 2e-3,
                     "warmup": 10},
        "align": {"data": "align", "train": "internvl", "epochs": 1, "batch_size": 32, "lr": 2e-3, "warmup": 10},
        # visual instruction tuning: one pass, the LLaVA recipe (tower frozen, projector + LM)
        "dense": {"train": "llava", "epochs": 1, "batch_size": 32, "lr": 1e-3, "warmup": 20},
        "eval_points": 8,  # held-out loss this many times during dense and expert training
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 32, "max_new_tokens": 8, "limit": None},
        "metric": "accuracy",
        # ddfm ablate's studies: training-image fractions (one pass each), alignment-step
        # fractions (on base_data of the images), other seeds of the whole demo
        "studies": {"data": [0.25, 0.5, 1], "base": [0, 0.25, 1], "base_data": 0.25, "seeds": [1, 2]},
    },
    # the demo before issue 13: a 200-step aligned base, 2,000 images seen about four times
    "image-small": {
        "help": "the earlier toy regime: 2,000 images repeated ~4 times from a briefly aligned base",
        "prepare": {"source": "mix", "train_size": 2000, "test_size": 300, "val_size": 200, "text_share": 0.05,
                    "max_words": 24},
        "model": "tiny-llava",
        "encoder": "efficientnet-lite0",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        "pretrain": None,
        "align": {"data": "train-images", "train": "internvl", "steps": 200, "batch_size": 32, "lr": 2e-3,
                  "warmup": 10},
        "dense": {"train": "internvl", "steps": 1000, "batch_size": 32, "lr": 1e-3, "warmup": 20},
        "eval_points": 8,
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 32, "max_new_tokens": 8, "limit": None},
        "metric": "accuracy",
        "studies": {"data": [0.25, 0.5, 1], "base": [0, 0.25, 1], "base_data": 0.25, "seeds": [1, 2]},
    },
    "text": {
        "help": "python-docs passages, minilm encoder, tiny-lm experts, perplexity",
        "prepare": {"source": "python-docs", "train_size": 1500, "test_size": 150, "max_words": 60},
        "model": "tiny-lm",
        "encoder": "minilm",
        "k": 2,
        "algorithm": "balanced",
        "fine_clusters": 64,
        "pretrain": None,
        # no vision: the centralised warm-up trains the whole language model briefly
        "align": {"data": "train", "train": "language", "steps": 60, "batch_size": 16, "lr": 2e-3, "warmup": 5},
        "skip_ablations": ["encoder"],  # no pixels or vision tower to ablate on text
        "dense": {"train": "language", "steps": 300, "batch_size": 16, "lr": 1e-3, "warmup": 20},
        "eval_points": 0,
        "routings": ["top-1", "soft", "posterior", "posterior-answers"],
        "eval": {"batch_size": 16, "max_new_tokens": 8, "limit": None},
        "metric": "perplexity",
    },
}

# --quick: overrides merged into the preset (toy sizes, same stages).
_QUICK_IMAGE = {"prepare": {"train_size": 24, "test_size": 6, "val_size": 4, "align_size": 16, "text_share": 0.05,
                            "max_words": 30},
                "encoder": "pixels", "fine_clusters": 8,
                "align": {"epochs": 1, "batch_size": 8}, "dense": {"epochs": 0.4, "batch_size": 8},
                "eval": {"batch_size": 16, "max_new_tokens": 3, "limit": 16}, "eval_points": 2,
                "studies": {"data": [0.5, 1], "base": [0, 1], "base_data": 0.5, "seeds": [1]}}
QUICK: dict[str, dict[str, Any]] = {
    "image": {**_QUICK_IMAGE, "prepare": {**_QUICK_IMAGE["prepare"], "pretrain_size": 12},
              "pretrain": {"epochs": 1, "batch_size": 4}},
    "image-small": {**_QUICK_IMAGE, "align": {"steps": 2, "batch_size": 8}, "dense": {"steps": 4, "batch_size": 8}},
    "text": {"prepare": {"train_size": 40, "test_size": 6, "max_words": 30}, "fine_clusters": 8,
             "align": {"steps": 2, "batch_size": 4}, "dense": {"steps": 4, "batch_size": 4},
             "eval": {"batch_size": 8, "max_new_tokens": 3, "limit": 6}},
}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_preset(name: str, quick: bool = False) -> dict[str, Any]:
    """The preset ``name``, with the :data:`QUICK` overrides when ``quick``."""
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return _merge(PRESETS[name], QUICK[name]) if quick else copy.deepcopy(PRESETS[name])


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A directory-safe name of an encoder spec or a variant ("tower:runs/x" -> "tower")."""
    return text.split(":")[0].replace("@", "-").replace("/", "-")


# ------------------------------------------------------------------------------ stage runner

class Pipeline:
    """Runs named stages in a run directory, each once: ``DONE.json`` in the stage's
    directory records its key (configuration + upstream keys), wall time and finish time."""

    def __init__(self, root: str | Path, seed: int, total: int | None = None):
        self.root, self.seed, self.total, self.count = Path(root), seed, total, 0
        self.keys: dict[str, str] = {}
        self.ran: list[str] = []

    def path(self, name: str) -> Path:
        return self.root / name

    def marker(self, name: str) -> dict | None:
        f = self.path(name) / "DONE.json"
        return read_json(f) if f.is_file() else None

    def run(self, name: str, config: dict, fn: Callable[[Path], Any], *, after: tuple[str, ...] = (),
            resumable: bool = False) -> Path:
        """Run ``fn(stage_dir)`` unless the stage is done with the same key; return its directory.

        A stage that is not done starts from an empty directory, except ``resumable`` ones
        (training), which continue from their own resume state.
        """
        self.count += 1
        key = _key({"config": config, "seed": self.seed, "after": [self.keys[a] for a in after]})
        self.keys[name] = key
        d = self.path(name)
        done = self.marker(name)
        where = f"[{self.count}/{self.total}]" if self.total else f"[{self.count}]"
        if done is not None and done.get("key") == key:
            log.info("demo %s %s: done (%.1f s), skipped", where, name, done.get("elapsed_s", 0.0))
            return d
        if d.exists() and not (resumable and done is None):
            shutil.rmtree(d)
        log.info("demo %s %s: running", where, name)
        t0 = time.perf_counter()
        fn(d)
        elapsed = time.perf_counter() - t0
        write_json(d / "DONE.json", {"stage": name, "key": key, "config": config, "elapsed_s": elapsed,
                                     "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        self.ran.append(name)
        log.info("demo %s %s: finished in %.1f s", where, name, elapsed)
        return d


# ------------------------------------------------------------------------------ stages

def stage_data(p: Pipeline, preset: dict) -> Path:
    from ddfm.prepare import PrepareConfig, prepare

    opts = dict(preset["prepare"])
    return p.run("data", opts, lambda d: prepare(PrepareConfig(out=str(d), seed=p.seed, **opts)))


def train_steps(opts: dict, n_records: int) -> dict:
    """A training stage's options with ``epochs`` turned into ``steps`` (ceil(epochs · records / batch))."""
    opts = dict(opts)
    epochs = opts.pop("epochs", None)
    if epochs is not None:
        opts["steps"] = max(1, math.ceil(epochs * n_records / opts["batch_size"]))
    return opts


def _records(path: Path) -> int:
    from ddfm.data import load_records

    return len(load_records(path).records)


def stage_base(p: Pipeline, preset: dict) -> Path:
    """init, the optional language pretraining and the centralised alignment stage; returns
    the aligned checkpoint that the dense baseline and every expert start from."""
    from ddfm.init import InitConfig, init

    p.run("init", {"model": preset["model"]},
          lambda d: init(InitConfig(preset=preset["model"], data=str(p.path("data") / "train.jsonl"), out=str(d),
                                    seed=p.seed)), after=("data",))
    start = "init"
    for name in ("pretrain", "align"):
        if preset.get(name) is not None:
            stage_base_step(p, preset[name], name, start)
            start = name
    return p.path("align")


def base_start(preset: dict) -> str:
    """The checkpoint the alignment stage starts from: the pretrained LM, else the init."""
    return "pretrain" if preset.get("pretrain") is not None else "init"


def stage_base_step(p: Pipeline, stage: dict, name: str, start: str, fraction: float = 1.0) -> Path:
    """One base stage (``pretrain`` or ``align`` of a preset) trained from checkpoint
    ``start`` on its data split; ``fraction`` scales its steps (``ddfm ablate``'s sweep of
    the base's strength)."""
    from ddfm.data import load_records, write_records
    from ddfm.train import TrainConfig, train

    data = p.path("data")

    def run(d: Path) -> None:
        split = stage["data"]
        source = data / f"{split.removesuffix('-images')}.jsonl"
        if split.endswith("-images"):  # image-text pairs only (a projector-only recipe learns nothing from text)
            source = d / "data.jsonl"
            write_records(source, [r for r in load_records(data / "train.jsonl").records if r.has_image])
        opts = {k: v for k, v in train_steps(stage, _records(source)).items() if k != "data"}
        opts["steps"] = max(1, round(opts["steps"] * fraction))
        train(TrainConfig(init=str(p.path(start)), data=str(source), out=str(d), seed=p.seed, resume=True,
                          device="cpu", **opts))

    return p.run(name, {**stage, **({"fraction": fraction} if fraction != 1.0 else {})}, run,
                 after=("data", start), resumable=True)


def stage_val_shards(p: Pipeline, preset: dict, part: str) -> list[Path]:
    """The held-out val records split by the cluster their image routes to (argmax of
    eq. 29), for the held-out losses of dense and experts; [] when the data has no val."""
    from ddfm.data import load_records, write_records
    from ddfm.evaluate import route_clusters
    from ddfm.router import Router

    val = p.path("data") / "val.jsonl"
    if not val.is_file() or not preset.get("eval_points"):
        return []
    name = f"{part}-val"

    def run(d: Path) -> None:
        router = Router.load(p.path(part))
        records = [r for r in load_records(val).records if r.has_image]
        clusters = route_clusters(router, records)
        for k in range(router.k):
            write_records(d / f"cluster-{k}.jsonl", [r for r, c in zip(records, clusters) if c == str(k)])

    d = p.run(name, {}, run, after=("data", part))
    return sorted(d.glob("cluster-*.jsonl"), key=lambda f: int(f.stem.split("-")[1]))


def _eval_every(preset: dict, steps: int) -> int:
    n = preset.get("eval_points") or 0
    return max(1, steps // n) if n else 0


def stage_dense(p: Pipeline, preset: dict, val: list[Path] | None = None, *, name: str = "dense",
                batch_divisor: int = 1, source: str = "data", base: str = "align") -> Path:
    """The dense baseline: all of stage ``source``'s training records, from checkpoint
    ``base``. ``batch_divisor`` K trains it at the experts' batch B/K for the same steps (a
    diagnostic of ``ddfm ablate``)."""
    from ddfm.train import TrainConfig, train

    data = p.path(source) / "train.jsonl"
    val = val or []

    def run(d: Path) -> None:
        opts = train_steps(preset["dense"], _records(data))
        opts["batch_size"] //= batch_divisor
        train(TrainConfig(init=str(p.path(base)), data=str(data), out=str(d), seed=p.seed, resume=True,
                              device="cpu", eval_data=[str(v) for v in val],
                              eval_every=_eval_every(preset, opts["steps"]), **opts))

    return p.run(name, {**preset["dense"], "val": [v.name for v in val], "eval_points": preset.get("eval_points"),
                        "batch_divisor": batch_divisor}, run, after=(source, base), resumable=True)


def stage_partition(p: Pipeline, preset: dict, *, encoder: str, k: int, algorithm: str,
                    prefix: str = "", source: str = "data", features: str | None = None) -> str:
    """embed + partition for one (encoder, K, algorithm) of the records in stage ``source``'s
    train.jsonl; ``features`` reuses an embed stage that covers them. Returns the partition
    stage name."""
    from ddfm.embed import EmbedConfig, embed
    from ddfm.partition import PartitionConfig, partition

    train_file = str(p.path(source) / "train.jsonl")
    emb, part = features or f"{prefix}embed", f"{prefix}partition"
    if features is None:
        after_embed = (source, "align") if encoder.startswith("tower:") else (source,)
        p.run(emb, {"encoder": encoder}, lambda d: embed(EmbedConfig(data=[train_file], encoder=encoder,
                                                                     out=str(d))), after=after_embed)
    cfg = {"k": k, "algorithm": algorithm, "fine_clusters": preset["fine_clusters"]}
    p.run(part, cfg, lambda d: partition(PartitionConfig(
        data=train_file, features=str(p.path(emb)), k=k, out=str(d), algorithm=algorithm,
        fine_clusters=preset["fine_clusters"], seed=p.seed, plot=True, tokenizer=str(p.path("init")))),
        after=(source, "init", emb))
    return part


def stage_experts(p: Pipeline, preset: dict, part: str, k: int, prefix: str = "",
                  val: list[Path] | None = None, *, source: str = "data", base: str = "align") -> list[str]:
    """K experts from checkpoint ``base``, compute-matched (--match) to the dense run on
    stage ``source``'s training records."""
    from ddfm.train import TrainConfig, train

    dense = train_steps(preset["dense"], _records(p.path(source) / "train.jsonl"))
    match = f"dense:{dense['steps']},{dense['batch_size']},{k}"
    opts = {n: v for n, v in dense.items() if n not in ("steps", "batch_size")}
    every = _eval_every(preset, dense["steps"])
    names = []
    for j in range(k):
        name = f"{prefix}expert-{j}"
        shard = str(p.path(part) / f"shard-{j:02d}.jsonl")
        held = [str(val[j])] if val else []
        p.run(name, {**opts, "match": match, "cluster": j, "val": held and val[j].name}, lambda d, shard=shard, j=j,
              held=held: train(TrainConfig(init=str(p.path(base)), data=shard, out=str(d), seed=p.seed,
                                               resume=True, device="cpu", match=match, cluster=j, eval_data=held,
                                               eval_every=every, **opts)),
              after=(base, part), resumable=True)
        names.append(name)
    return names


def stage_eval(p: Pipeline, preset: dict, name: str, experts: list[str], part: str,
               routing: dict | None) -> Path:
    """Evaluate the dense model (``routing`` None) or the ensemble of ``experts``."""
    from ddfm.data import load_records
    from ddfm.ensemble import Ensemble, EnsembleConfig
    from ddfm.evaluate import chance_levels, evaluate, write_result
    from ddfm.router import Router

    ev = preset["eval"]

    def run(d: Path) -> None:
        import torch

        torch.manual_seed(p.seed)
        test = p.path("data") / "test.jsonl"
        records = load_records(test, check_images=False).records  # evaluate() lists failed images
        if ev["limit"] and len(records) > ev["limit"]:  # spread over the file: every task and source
            records = records[:: -(-len(records) // ev["limit"])]
        router_file = p.path(part) / "router.json"
        ens = Ensemble.from_config(EnsembleConfig(experts=[str(p.path(e)) for e in experts],
                                                  router=str(router_file) if routing else None, device="cpu",
                                                  **(routing or {"mode": "uniform"})))
        result = evaluate(ens, records, batch_size=ev["batch_size"], max_new_tokens=ev["max_new_tokens"],
                          cluster_router=Router.load(router_file),
                          chance=chance_levels(records, p.path("data") / "prepare.json"), desc=name)
        write_result(d, result, f"{name}: {', '.join(experts)}", meta={"experts": experts, "routing": routing})

    return p.run(name, {"eval": ev, "routing": routing, "experts": experts}, run, after=tuple(experts) + (part,))


# ------------------------------------------------------------------------------ the demo

@dataclass
class DemoConfig:
    """``ddfm demo [--preset image|text] [--quick] [--out DIR] [--seed N]``."""

    out: str = arg("run directory (one subdirectory per stage, REPORT.md)", default="runs/demo")
    preset: str = arg("demo preset: " + "; ".join(f"{k} ({v['help']})" for k, v in PRESETS.items()),
                      default="image", choices=tuple(PRESETS))
    quick: bool = arg("toy sizes: the same pipeline in under a minute (for the tests)", default=False)
    seed: int = arg("seed of every stage (data, init, training order, k-means)", default=0)
    threads: Optional[int] = arg("torch threads (default: torch's choice)", default=None)

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"--preset: unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {self.threads}")


def run_core(p: Pipeline, preset: dict) -> dict[str, Any]:
    """The demo's stages up to the evaluations; returns the names the report needs."""
    stage_data(p, preset)
    stage_base(p, preset)
    part = stage_partition(p, preset, encoder=preset["encoder"], k=preset["k"], algorithm=preset["algorithm"])
    val = stage_val_shards(p, preset, part)
    stage_dense(p, preset, val)
    experts = stage_experts(p, preset, part, preset["k"], val=val)
    evals = {"dense": stage_eval(p, preset, "eval-dense", ["dense"], part, None)}
    for r in preset["routings"]:
        evals[r] = stage_eval(p, preset, f"eval-{r}", experts, part, ROUTINGS[r])
    return {"partition": part, "experts": experts, "evals": evals, "val": val}


def demo(cfg: DemoConfig) -> Path:
    """Run (or resume) the demo in ``cfg.out``; write and return ``REPORT.md``."""
    import torch

    from ddfm.report import write_report

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    preset = resolve_preset(cfg.preset, cfg.quick)
    t0 = time.perf_counter()
    stages = ["data", "init", "pretrain", "align", "embed", "partition", "val", "dense"]
    n_stages = sum(s != "pretrain" or preset.get("pretrain") is not None for s in stages) - (not preset.get("eval_points"))
    p = Pipeline(cfg.out, cfg.seed, total=n_stages + preset["k"] + 1 + len(preset["routings"]))
    log.info("demo: preset %s%s, seed %d, run directory %s", cfg.preset, " (quick)" if cfg.quick else "",
             cfg.seed, p.root)
    names = run_core(p, preset)
    report = write_report(p, preset, names, title=f"ddfm demo — preset {cfg.preset}" + (" (quick)" if cfg.quick else ""),
                          command=_command(cfg), this_run_s=time.perf_counter() - t0)
    print(report.read_text().split("## ", 2)[1].split("\n", 1)[1].strip())  # the main table
    print(f"\ndemo: finished in {time.perf_counter() - t0:.0f} s; report: {report.resolve()}")
    return report


def _command(cfg: DemoConfig) -> str:
    parts = ["ddfm demo"]
    if cfg.preset != "image":
        parts.append(f"--preset {cfg.preset}")
    if cfg.quick:
        parts.append("--quick")
    if cfg.out != "runs/demo":
        parts.append(f"--out {cfg.out}")
    if cfg.seed:
        parts.append(f"--seed {cfg.seed}")
    return " ".join(parts)
