"""The run of a whole pipeline, stage by stage, each once: what ``ddfm demo`` and ``ddfm ablate`` share.

    p = Pipeline("runs/demo", seed=0, device="auto")
    stage_data(p, preset); stage_base(p, preset)
    part = stage_partition(p, preset, encoder="efficientnet-lite0", k=2, algorithm="balanced")
    stage_dense(p, preset); experts = stage_experts(p, preset, part, 2)
    stage_eval(p, preset, "eval-top-1", experts, part, ROUTINGS["top-1"])

Each stage function runs one ddfm stage (prepare, init, train, embed + partition, eval)
through :meth:`Pipeline.run`, which writes ``DONE.json`` with the stage's key (its
configuration and the keys of the stages it reads) and skips a stage whose marker holds
the same key; a training stage that was interrupted continues from its resume state.
``preset`` is a demo preset (:data:`ddfm.demo.PRESETS`): the sizes and recipes of every stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ddfm.data import load_records, write_records
from ddfm.embed import EmbedConfig, embed
from ddfm.ensemble import Ensemble, EnsembleConfig
from ddfm.evaluate import chance_levels, evaluate, route_clusters, write_result
from ddfm.init import InitConfig, init
from ddfm.io import read_json, write_json
from ddfm.partition import PartitionConfig, partition
from ddfm.prepare import PrepareConfig, prepare
from ddfm.router import Router
from ddfm.routing import RoutingSetting
from ddfm.train import TrainConfig, train

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "slug", "train_steps", "base_start", "stage_data", "stage_base", "stage_base_step",
           "stage_val_shards", "stage_dense", "stage_partition", "stage_experts", "stage_eval"]


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A directory-safe name of an encoder spec or a variant ("tower:runs/x" -> "tower")."""
    return text.split(":")[0].replace("@", "-").replace("/", "-")


# ------------------------------------------------------------------------------ stage runner

class Pipeline:
    """Runs named stages in a run directory, each once: ``DONE.json`` in the stage's
    directory records its key (configuration + upstream keys), wall time and finish time."""
    def __init__(self, root: str | Path, seed: int, total: int | None = None, device: str = "auto"):
        self.root, self.seed, self.total, self.count = Path(root), seed, total, 0
        self.device = device  # every stage's torch device (not part of the stage keys)
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

    return len(load_records(path).records)


def stage_base(p: Pipeline, preset: dict) -> Path:
    """init, the optional language pretraining and the centralised alignment stage; returns
    the aligned checkpoint that the dense baseline and every expert start from."""
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
                          device=p.device, **opts))

    return p.run(name, {**stage, **({"fraction": fraction} if fraction != 1.0 else {})}, run,
                 after=("data", start), resumable=True)


def stage_val_shards(p: Pipeline, preset: dict, part: str) -> list[Path]:
    """The held-out val records split by the cluster their image routes to (argmax of
    eq. 29), for the held-out losses of dense and experts; [] when the data has no val."""
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
    data = p.path(source) / "train.jsonl"
    val = val or []

    def run(d: Path) -> None:
        opts = train_steps(preset["dense"], _records(data))
        opts["batch_size"] //= batch_divisor
        train(TrainConfig(init=str(p.path(base)), data=str(data), out=str(d), seed=p.seed, resume=True,
                              device=p.device, eval_data=[str(v) for v in val],
                              eval_every=_eval_every(preset, opts["steps"]), **opts))

    return p.run(name, {**preset["dense"], "val": [v.name for v in val], "eval_points": preset.get("eval_points"),
                        "batch_divisor": batch_divisor}, run, after=(source, base), resumable=True)


def stage_partition(p: Pipeline, preset: dict, *, encoder: str, k: int, algorithm: str,
                    prefix: str = "", source: str = "data", features: str | None = None) -> str:
    """embed + partition for one (encoder, K, algorithm) of the records in stage ``source``'s
    train.jsonl; ``features`` reuses an embed stage that covers them. Returns the partition
    stage name."""
    train_file = str(p.path(source) / "train.jsonl")
    emb, part = features or f"{prefix}embed", f"{prefix}partition"
    if features is None:
        after_embed = (source, "align") if encoder.startswith("tower:") else (source,)
        p.run(emb, {"encoder": encoder}, lambda d: embed(EmbedConfig(data=[train_file], encoder=encoder,
                                                                     out=str(d), device=p.device)), after=after_embed)
    cfg = {"k": k, "algorithm": algorithm, "fine_clusters": preset["fine_clusters"]}
    p.run(part, cfg, lambda d: partition(PartitionConfig(
        data=train_file, features=str(p.path(emb)), k=k, out=str(d), algorithm=algorithm,
        fine_clusters=preset["fine_clusters"], seed=p.seed, plot=True, tokenizer=str(p.path("init")))),
        after=(source, "init", emb))
    return part


def stage_experts(p: Pipeline, preset: dict, part: str, k: int, prefix: str = "",
                  val: list[Path] | None = None, *, source: str = "data", base: str = "align",
                  train_options: dict | None = None) -> list[str]:
    """K experts from checkpoint ``base``, compute-matched (--match) to the dense run on
    stage ``source``'s training records; ``train_options``: more ``TrainConfig`` fields
    for the experts only (e.g. ``{"loss_on": "all"}``)."""
    dense = train_steps(preset["dense"], _records(p.path(source) / "train.jsonl"))
    match = f"dense:{dense['steps']},{dense['batch_size']},{k}"
    opts = {n: v for n, v in dense.items() if n not in ("steps", "batch_size")} | (train_options or {})
    every = _eval_every(preset, dense["steps"])
    names = []
    for j in range(k):
        name = f"{prefix}expert-{j}"
        shard = str(p.path(part) / f"shard-{j:02d}.jsonl")
        held = [str(val[j])] if val else []
        p.run(name, {**opts, "match": match, "cluster": j, "val": held and val[j].name}, lambda d, shard=shard, j=j,
              held=held: train(TrainConfig(init=str(p.path(base)), data=shard, out=str(d), seed=p.seed,
                                               resume=True, device=p.device, match=match, cluster=j, eval_data=held,
                                               eval_every=every, **opts)),
              after=(base, part), resumable=True)
        names.append(name)
    return names


def stage_eval(p: Pipeline, preset: dict, name: str, experts: list[str], part: str,
               routing: RoutingSetting | None) -> Path:
    """Evaluate the dense model (``routing`` None) or the ensemble of ``experts`` routed by ``routing``."""
    ev = preset["eval"]
    options = routing.options() if routing is not None else None

    def run(d: Path) -> None:
        torch.manual_seed(p.seed)
        test = p.path("data") / "test.jsonl"
        records = load_records(test, check_images=False).records  # evaluate() lists failed images
        if ev["limit"] and len(records) > ev["limit"]:  # spread over the file: every task and source
            records = records[:: -(-len(records) // ev["limit"])]
        router_file = p.path(part) / "router.json"
        ens = Ensemble.from_config(EnsembleConfig(experts=[str(p.path(e)) for e in experts],
                                                  router=str(router_file) if routing else None, device=p.device,
                                                  **(options or {"mode": "uniform"})))
        result = evaluate(ens, records, batch_size=ev["batch_size"], max_new_tokens=ev["max_new_tokens"],
                          cluster_router=Router.load(router_file),
                          chance=chance_levels(records, p.path("data") / "prepare.json"), desc=name)
        write_result(d, result, f"{name}: {', '.join(experts)}", meta={"experts": experts, "routing": options})

    return p.run(name, {"eval": ev, "routing": options, "experts": experts}, run, after=tuple(experts) + (part,))
