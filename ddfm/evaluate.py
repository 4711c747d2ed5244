"""Evaluation: accuracy and perplexity of one model or an ensemble on a test file (paper §5).

    ddfm eval data/mix/test.jsonl --experts runs/demo/dense --out runs/demo/eval-dense
    ddfm eval data/mix/test.jsonl --experts runs/demo/expert-0 runs/demo/expert-1 \\
        --router runs/demo/partition/router.json --mode centroid --top-k 1 --out runs/demo/eval-top1

For every record of a canonical test file:

* question-answer records (those with an image, or any record whose task has a short
  answer set) get a greedy generation scored by VQA-style normalised exact match
  (:func:`normalize_answer`: lowercase, punctuation and articles stripped, number words
  to digits, as in the official VQA evaluation);
* every record gets the negative log-likelihood of its reference answer under the model
  (or the mixture, eq. 24) from :meth:`ddfm.ensemble.Ensemble.score`; perplexity is
  exp(Σ nll / Σ tokens). Text-only test sets get perplexity only.

A record whose image is missing or unreadable is not evaluated: it is left out of every
figure (a data fault is not the model's error, and every model evaluated on the same file
leaves out the same records, so comparisons stay paired), logged, and listed in
``eval.json`` "skipped_images" (file, line, id, reason) and counted in ``eval.md``.

Results are aggregated per task, per source and per cluster (the cluster a record's image
routes to under ``--clusters``/``--router``: argmax of eq. 29), written as ``eval.json``,
``eval.md`` and ``predictions.jsonl``. The chance level of each task comes from the
prepare stage's ``prepare.json`` beside the test file, or else from the test answers
(majority-answer rate).

Python API::

    ens = Ensemble.from_pretrained(["runs/dense"])
    result = evaluate(ens, load_records("data/mix/test.jsonl").records)
    result["overall"]["accuracy"], result["by_task"]["fmnist-name"]["perplexity"]
"""

from __future__ import annotations

import logging
import math
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from ddfm.config import arg, to_dict
from ddfm.data import IMAGE_TOKEN, Record, check_images, load_records, log_failed_images
from ddfm.io import atomic_write_text, read_json, write_json, write_jsonl

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "evaluate_cli", "evaluate", "evaluate_paths", "normalize_answer", "exact_match",
           "aggregate", "chance_levels", "markdown_report"]

# ------------------------------------------------------------------------------ VQA normalisation
# The official VQA evaluation (vqaEval.py, Antol et al. 2015): contractions, punctuation,
# number words -> digits, articles dropped.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hes": "he's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd",
    "itll": "it'll", "lets": "let's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
    "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
          ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    # as vqaEval.processPunctuation: a mark next to a space (or a digit comma) vanishes,
    # any other mark becomes a space; periods not inside numbers vanish
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or re.search(_COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def normalize_answer(text: str) -> str:
    """VQA-normalised answer: lowercase, punctuation stripped, number words to digits,
    articles (a, an, the) dropped, contractions restored, whitespace collapsed.

    >>> normalize_answer("  The Two dogs!")
    '2 dogs'
    """
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _process_punctuation(text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def exact_match(prediction: str, reference: str) -> bool:
    """Normalised exact match of a generated answer against the reference answer."""
    return normalize_answer(prediction) == normalize_answer(reference)


# ------------------------------------------------------------------------------ aggregation

def _group_stats(rows: list[dict]) -> dict[str, Any]:
    qa = [r for r in rows if r.get("correct") is not None]
    nll = sum(r["nll"] for r in rows if r.get("nll") is not None)
    tokens = sum(r["n_tokens"] for r in rows if r.get("nll") is not None)
    return {
        "n": len(rows),
        "n_qa": len(qa),
        "accuracy": (sum(bool(r["correct"]) for r in qa) / len(qa)) if qa else None,
        "nll_per_token": (nll / tokens) if tokens else None,
        "perplexity": math.exp(nll / tokens) if tokens else None,
        "answer_tokens": tokens,
    }


def aggregate(rows: Sequence[dict], key: str | None = None) -> dict[str, Any]:
    """Accuracy (mean of ``correct`` over rows that have one) and token-weighted NLL /
    perplexity, overall (``key=None``) or per value of ``row[key]`` ("task", "source", "cluster").

    rows: ``{"task", "source", "cluster", "correct": bool | None, "nll": float (nats,
    summed over the answer), "n_tokens": int}``.
    """
    if key is None:
        return _group_stats(list(rows))
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r.get(key))].append(r)
    return {name: _group_stats(groups[name]) for name in sorted(groups)}


def chance_levels(records: Sequence[Record], prepare_json: str | Path | None = None) -> dict[str, float]:
    """Chance accuracy per question-answer task: ``chance_majority`` from prepare.json when
    given and present, else the test answers' majority-answer rate."""
    if prepare_json is not None and Path(prepare_json).is_file():
        tasks = read_json(prepare_json).get("tasks", {})
        found = {t: v["chance_majority"] for t, v in tasks.items() if v.get("chance_majority") is not None}
        if found:
            return found
    by_task: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if _is_qa(r):
            by_task[r.task].append(normalize_answer(r.answer()))
    return {t: Counter(a).most_common(1)[0][1] / len(a) for t, a in by_task.items()}


# ------------------------------------------------------------------------------ evaluation

def _is_qa(record: Record) -> bool:
    # short-answer questions: image records (prepare's text records are passages, scored by perplexity)
    return record.has_image


def to_request(record: Record):
    """The record's first human turn as an ensemble :class:`~ddfm.ensemble.Request`."""
    from ddfm.ensemble import Request

    prompt = record.prompt()
    if IMAGE_TOKEN in prompt:
        before, after = prompt.split(IMAGE_TOKEN, 1)
        prompt = (before + after.lstrip("\n")).strip()
    return Request(prompt=prompt, image=str(record.image_path) if record.image_path else None)


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


class _Progress:
    """tqdm on a terminal, a plain log line every ~10 % otherwise."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self.next_log = total, desc, 0, 0.1
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="rec", dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.total and self.done / self.total >= self.next_log:
            log.info("%s: %d/%d", self.desc, self.done, self.total)
            self.next_log = self.done / self.total + 0.1

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _clusters(router, records: list[Record]) -> list[str]:
    """Cluster of each record under ``router`` (argmax of eq. 29); text records under an
    image router are 'text'."""
    import torch

    from ddfm.data import open_image

    if router is None:
        return ["-"] * len(records)
    labels = ["text"] * len(records)
    if router.modality == "text":
        idx, items = list(range(len(records))), [r.prompt() for r in records]
    else:
        idx = [i for i, r in enumerate(records) if r.image_path is not None]
        items = [open_image(records[i].image_path) for i in idx]
    for chunk in _batches(list(zip(idx, items)), 256):
        w = router.probabilities(router.features([it for _, it in chunk]))
        for (i, _), k in zip(chunk, torch.argmax(w, dim=1).tolist()):
            labels[i] = str(k)
    return labels


def evaluate(ensemble, records: Sequence[Record], *, batch_size: int = 32, max_new_tokens: int = 12,
             cluster_router=None, chance: dict[str, float] | None = None, desc: str = "eval") -> dict[str, Any]:
    """Evaluate an :class:`~ddfm.ensemble.Ensemble` (one model = an ensemble of one) on records.

    Returns ``{"overall", "by_task", "by_source", "by_cluster", "chance", "predictions",
    "n_records", "skipped_images", "elapsed_s"}``; every group holds n, accuracy (normalised
    exact match over its question-answer records), nll_per_token and perplexity. Records
    whose image is missing or unreadable are not evaluated and are listed in
    ``skipped_images`` ``{"count", "records": [{file, line, id, image, reason}]}``.
    """
    records, skipped = check_images(records)
    if not records:
        raise ValueError("eval: the test file holds no records" + (
            f" whose image can be read ({len(skipped)} failed, first: {skipped[0]})" if skipped else ""))
    log_failed_images(desc, skipped, "eval.json")
    t0 = time.perf_counter()
    clusters = _clusters(cluster_router, records)
    rows = [{"id": r.id, "task": r.task, "source": r.source, "cluster": c, "reference": r.answer(),
             "prediction": None, "correct": None} for r, c in zip(records, clusters)]
    qa = [i for i, r in enumerate(records) if _is_qa(r)]
    bar = _Progress(len(qa) + len(records), desc)
    for chunk in _batches(qa, batch_size):
        gens = ensemble.generate([to_request(records[i]) for i in chunk], max_new_tokens=max_new_tokens)
        for i, g in zip(chunk, gens):
            rows[i].update(prediction=g.text.strip(), correct=exact_match(g.text, records[i].answer()),
                           weights=g.weights)
        bar.update(len(chunk))
    # score short and long answers apart: padding to the longest passage would waste the batch
    order = sorted(range(len(records)), key=lambda i: len(records[i].answer()))
    for chunk in _batches(order, batch_size):
        scores = ensemble.score([to_request(records[i]) for i in chunk], [records[i].answer() for i in chunk])
        for i, s in zip(chunk, scores):
            rows[i].update(nll=s["nll"], n_tokens=s["n_tokens"])
            rows[i].setdefault("weights", s["weights"])
        bar.update(len(chunk))
    bar.close()
    return {"overall": aggregate(rows), "by_task": aggregate(rows, "task"),
            "by_source": aggregate(rows, "source"), "by_cluster": aggregate(rows, "cluster"),
            "chance": dict(chance or {}), "predictions": rows, "n_records": len(rows),
            "skipped_images": {"count": len(skipped), "records": [f.to_json() for f in skipped]},
            "elapsed_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ report

def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def markdown_report(result: dict, title: str = "Evaluation") -> str:
    """Markdown tables of an :func:`evaluate` result (accuracy in %, perplexity)."""
    chance = result.get("chance", {})
    skipped = (result.get("skipped_images") or {}).get("count", 0)
    lines = [f"# {title}", "", f"{result['n_records']} records, {result['elapsed_s']:.1f} s"
             + (f"; {skipped} record(s) skipped: their image failed (listed in eval.json)" if skipped else ""), ""]
    o = result["overall"]
    lines += ["| overall | accuracy % | perplexity | records |", "| --- | ---: | ---: | ---: |",
              f"| all | {_fmt(o['accuracy'], True)} | {_fmt(o['perplexity'])} | {o['n']} |", ""]
    for key, label in (("by_task", "task"), ("by_source", "source"), ("by_cluster", "cluster")):
        lines += [f"| {label} | accuracy % | chance % | perplexity | records |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, g in result[key].items():
            c = chance.get(name) if key == "by_task" else None
            lines.append(f"| {name} | {_fmt(g['accuracy'], True)} | {_fmt(c, True)} | {_fmt(g['perplexity'])} | {g['n']} |")
        lines.append("")
    return "\n".join(lines)


def write_result(out: str | Path, result: dict, title: str, meta: dict | None = None) -> Path:
    """Write eval.json (without per-record rows), predictions.jsonl and eval.md to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", result["predictions"])
    summary = {k: v for k, v in result.items() if k != "predictions"}
    atomic_write_text(out / "eval.md", markdown_report(result, title) + "\n")
    write_json(out / "eval.json", {**summary, **({"meta": meta} if meta else {})})
    return out


# ------------------------------------------------------------------------------ CLI

@dataclass
class EvalConfig:
    """``ddfm eval TEST --experts DIR... [--router FILE --mode M --top-k N] --out DIR``."""

    data: str = arg("test file in the canonical format (JSONL or LLaVA JSON list)", positional=True)
    experts: list[str] = arg("one model directory, or the K expert directories in the router's order")
    out: str = arg("output directory (eval.json, eval.md, predictions.jsonl)", default="runs/eval")
    router: Optional[str] = arg("router.json (or partition directory) of the ensemble", default=None)
    mode: str = arg("routing: centroid, posterior, uniform or expert:J", default="centroid")
    top_k: Optional[int] = arg("experts mixed per request (default: router's top_k for centroid, else all)",
                               default=None)
    temperature: Optional[float] = arg("router temperature τ of eq. 29 (default: the router file's)", default=None)
    evidence: str = arg("posterior routing: prompt tokens counted as evidence (prompt = all, answers = only "
                        "earlier assistant turns)", default="prompt", choices=("prompt", "answers"))
    clusters: Optional[str] = arg("router file whose clusters group the results (default: --router)", default=None)
    prepare_json: Optional[str] = arg("prepare.json with chance levels (default: beside the test file)", default=None)
    batch_size: int = arg("requests per generate/score call", default=32)
    max_new_tokens: int = arg("tokens generated per answer at most", default=12)
    limit: Optional[int] = arg("evaluate only the first N records", default=None)
    device: str = arg("torch device", default="cpu")

    def __post_init__(self):
        if not self.experts:
            raise ValueError("--experts: give one model directory or the K expert directories")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if len(self.experts) > 1 and self.router is None and self.mode == "centroid":
            raise ValueError("--router is required for centroid routing of several experts "
                             "(or use --mode uniform / posterior)")


def evaluate_paths(cfg: EvalConfig) -> dict[str, Any]:
    """Load the model/ensemble and the test file named by ``cfg`` and evaluate (no files written)."""
    import torch

    from ddfm.ensemble import Ensemble
    from ddfm.router import Router

    torch.manual_seed(0)
    records = load_records(cfg.data, check_images=False).records  # evaluate() reports failed images
    if cfg.limit is not None:
        records = records[:cfg.limit]
    ens = Ensemble.from_pretrained(cfg.experts, cfg.router, mode=cfg.mode, top_k=cfg.top_k,
                                   temperature=cfg.temperature, device=cfg.device,
                                   evidence=cfg.evidence)
    cluster_file = cfg.clusters or cfg.router
    cluster_router = Router.load(cluster_file) if cluster_file else None
    prepare_json = cfg.prepare_json or Path(cfg.data).parent / "prepare.json"
    chance = chance_levels(records, prepare_json)
    return evaluate(ens, records, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                    cluster_router=cluster_router, chance=chance, desc=f"eval {Path(cfg.out).name}")


def evaluate_cli(cfg: EvalConfig) -> Path:
    """``ddfm eval``: evaluate and write eval.json, eval.md, predictions.jsonl to ``cfg.out``."""
    result = evaluate_paths(cfg)
    names = ", ".join(Path(e).name for e in cfg.experts)
    title = f"Evaluation of {names} ({cfg.mode}" + (f", top-{cfg.top_k}" if cfg.top_k else "") + ")"
    out = write_result(cfg.out, result, title, meta={"config": to_dict(cfg)})
    o = result["overall"]
    log.info("eval: accuracy %s %%, perplexity %s over %d records -> %s", _fmt(o["accuracy"], True),
             _fmt(o["perplexity"]), result["n_records"], out / "eval.md")
    return out
