"""Evaluation: accuracy and perplexity of one model or an ensemble on a test file (paper §5).

    ddfm eval data/mix/test.jsonl --experts runs/demo/dense --out runs/demo/eval-dense
    ddfm eval data/mix/test.jsonl --experts runs/demo/expert-0 runs/demo/expert-1 \\
        --router runs/demo/partition/router.json --mode centroid --top-k 1 --out runs/demo/eval-top1

For every record of a canonical test file:

* question-answer records — those whose reference answer is short, at most
  ``QA_MAX_WORDS`` (5) words (``--qa-max-words``), with an image or text-only alike
  (:func:`is_qa`) — get a greedy generation scored by the official VQA accuracy against
  the one reference: exact match after VQA normalisation (:mod:`ddfm.vqa`: punctuation,
  lowercase, number words to digits, articles dropped, contractions restored);
* every record gets the negative log-likelihood of its reference answer under the model
  (or the mixture, eq. 24) from :meth:`ddfm.ensemble.Ensemble.score`; perplexity is
  exp(Σ nll / Σ tokens). Longer answers (passages) get perplexity only.

Results are aggregated per task, per source (``task``/``source`` fields, or the fallbacks
of :class:`ddfm.data.Record`) and per cluster (the cluster a record's image routes to
under ``--clusters``/``--router``: argmax of eq. 29), written as ``eval.json``,
``eval.md`` and ``predictions.jsonl``. The chance level of a task (``chance``) is the
test accuracy of always giving the train split's majority answer, from the prepare
stage's ``prepare.json`` beside the test file. Without one, the test answers' own
majority rate is reported instead, under ``chance_oracle`` and marked "(oracle)": it is
read off the test answers, so it is not a chance level.

A record whose image is missing or unreadable is not evaluated: it is left out of every
figure (a data fault is not the model's error, and every model evaluated on the same file
leaves out the same records, so comparisons stay paired), logged, and listed in
``eval.json`` "skipped_images" (file, line, id, reason) and counted in ``eval.md``.

``--text`` scores plain text instead, as language-model harnesses do: each record's
reference answer (a python-docs passage) is tokenized without a chat template and scored
in lm-evaluation-harness's ``loglikelihood_rolling`` windows (:func:`rolling_windows`,
:func:`evaluate_text`), conditioned on one prefix token; the result is the total NLL and
the perplexity per token, per word and per byte (``word_perplexity``, ``byte_perplexity``,
``bits_per_byte``: the numbers lm-eval reports for such a task through ``ddfm serve``).

Python API::

    ens = Ensemble.from_pretrained(["runs/dense"])
    result = evaluate(ens, load_records("data/mix/test.jsonl").records)
    result["overall"]["accuracy"], result["by_task"]["fmnist-name"]["perplexity"]
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

from ddfm.config import arg, to_dict
from ddfm.data import SHORT_ANSWER_WORDS, Record, check_images, load_records, log_failed_images, open_image
from ddfm.ensemble import Ensemble, Request
from ddfm.ensemble.config import EnsembleConfig
from ddfm.io import atomic_write_text, read_json, write_json, write_jsonl
from ddfm.router import Router
from ddfm.runtime.progress import progress
from ddfm.runtime.provenance import provenance
from ddfm.vqa import exact_match, normalize_answer, vqa_accuracy

log = logging.getLogger(__name__)

__all__ = ["EvalConfig", "evaluate_cli", "evaluate", "evaluate_paths", "normalize_answer", "exact_match",
           "vqa_accuracy", "is_qa", "QA_MAX_WORDS", "aggregate", "route_clusters", "chance_levels", "oracle_chance_levels",
           "markdown_report", "rolling_windows", "prefix_token_id", "evaluate_text", "aggregate_text",
           "text_markdown_report"]

# records whose reference answer has at most this many words are question-answer records
# (accuracy + perplexity); longer ones get perplexity only. --qa-max-words changes it.
QA_MAX_WORDS = SHORT_ANSWER_WORDS
EVAL_MAX_NEW_TOKENS = 12  # eval's own answer length: references are a few words

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


def _by_key(rows: Sequence[dict], key: str | None, stats: Callable[[list[dict]], dict]) -> dict[str, Any]:
    """``stats`` of all rows (``key=None``) or ``{value: stats of its rows}`` per ``str(row[key])``, sorted."""
    if key is None:
        return stats(list(rows))
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[str(r.get(key))].append(r)
    return {name: stats(groups[name]) for name in sorted(groups)}


def aggregate(rows: Sequence[dict], key: str | None = None) -> dict[str, Any]:
    """Accuracy (mean of ``correct`` over rows that have one) and token-weighted NLL /
    perplexity, overall (``key=None``) or per value of ``row[key]`` ("task", "source", "cluster").

    rows: ``{"task", "source", "cluster", "correct": bool | None, "nll": float (nats,
    summed over the answer), "n_tokens": int}``.
    """
    return _by_key(rows, key, _group_stats)


def chance_levels(records: Sequence[Record], prepare_json: str | Path | None = None, *,
                  qa_max_words: int = QA_MAX_WORDS) -> dict[str, float]:
    """Chance accuracy per question-answer task of ``records``: the accuracy of always giving
    the *train* split's majority answer (``majority_answer`` in ``prepare.json``), scored by
    :func:`exact_match` on these very records — so a ``--limit`` subset gets its own rate and
    chance is measured as accuracy is. ``{}`` without a prepare.json; the test answers alone
    cannot give a chance level: see :func:`oracle_chance_levels`."""
    if prepare_json is None or not Path(prepare_json).is_file():
        return {}
    tasks = read_json(prepare_json).get("tasks", {})
    hits: dict[str, list[bool]] = defaultdict(list)
    for r in records:
        majority = (tasks.get(r.task) or {}).get("majority_answer")
        if majority is not None and is_qa(r, qa_max_words):
            hits[r.task].append(exact_match(majority, r.answer()))
    return {t: sum(h) / len(h) for t, h in sorted(hits.items())}


def oracle_chance_levels(records: Sequence[Record], *, skip: Iterable[str] = (),
                         qa_max_words: int = QA_MAX_WORDS) -> dict[str, float]:
    """Per question-answer task (except ``skip``): the share of its records whose normalised
    reference is the task's most common one — the best accuracy any constant answer reaches
    on these records. An *oracle* figure: it picks the answer by looking at the test answers,
    so it is reported as ``chance_oracle``, never as ``chance``."""
    skip = set(skip)
    by_task: dict[str, list[str]] = defaultdict(list)
    for r in records:
        if r.task not in skip and is_qa(r, qa_max_words):
            by_task[r.task].append(normalize_answer(r.answer()))
    return {t: Counter(a).most_common(1)[0][1] / len(a) for t, a in sorted(by_task.items())}


# ------------------------------------------------------------------------------ evaluation

def is_qa(record: Record, max_words: int = QA_MAX_WORDS) -> bool:
    """A question-answer record: its reference answer has at most ``max_words`` words
    (VQA-style short answers, with an image or text-only: "What is 12+7?" -> "19"). Such
    records are scored by accuracy and perplexity; longer answers (passages, descriptions)
    by perplexity only, since an exact match of a passage says nothing."""
    return len(record.answer().split()) <= max_words


def to_request(record: Record):
    """The record's first human turn as an ensemble :class:`~ddfm.ensemble.Request`, with
    the turns before it (a system prompt) as history: the prompt training saw before the
    reference answer."""
    first = next(i for i, t in enumerate(record.conversations) if t["from"] == "human")
    # the <image> placeholder stays where the record puts it (LLaVA data has both
    # "<image>\nWhat is this?" and "What is this?\n<image>")
    return Request(prompt=record.conversations[first]["value"],
                   image=str(record.image_path) if record.image_path else None,
                   history=record.conversations[:first] or None)


def _batches(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def route_clusters(router, records: Sequence[Record]) -> list[str]:
    """Cluster of each record under ``router`` (argmax of eq. 29: the nearest centroid);
    text records under an image router are 'text'. Images are decoded 256 at a time."""
    import torch

    if router is None:
        return ["-"] * len(records)
    labels = ["text"] * len(records)
    if router.modality == "text":
        idx = list(range(len(records)))
    else:
        idx = [i for i, r in enumerate(records) if r.image_path is not None]
    for chunk in _batches(idx, 256):
        items = [records[i].prompt() if router.modality == "text" else open_image(records[i].image_path)
                 for i in chunk]
        w = router.log_probabilities(router.features(items))
        for i, k in zip(chunk, torch.argmax(w, dim=1).tolist()):
            labels[i] = str(k)
    return labels


def evaluate(ensemble, records: Sequence[Record], *, batch_size: int = 32,
             max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
             cluster_router=None, chance: dict[str, float] | None = None, qa_max_words: int = QA_MAX_WORDS,
             desc: str = "eval") -> dict[str, Any]:
    """Evaluate an :class:`~ddfm.ensemble.Ensemble` (one model = an ensemble of one) on records.

    Returns ``{"overall", "by_task", "by_source", "by_cluster", "chance", "chance_oracle",
    "qa_cut_short", "predictions", "n_records", "elapsed_s"}``; every group holds n, n_qa,
    accuracy (normalised exact match over its question-answer records, :func:`is_qa`),
    nll_per_token and perplexity. ``chance`` is as given (:func:`chance_levels`);
    ``chance_oracle`` holds :func:`oracle_chance_levels` of the question-answer tasks that
    ``chance`` lacks; ``qa_cut_short`` counts (and names up to 20 of) the question-answer
    records whose reference has more than ``max_new_tokens`` tokens, which cannot match.
    Records whose image is missing or unreadable are not evaluated and are listed in
    ``skipped_images`` ``{"count", "records": [{file, line, id, image, reason}]}``.
    """
    records, skipped = check_images(records)
    if not records:
        raise ValueError("eval: the test file holds no records" + (
            f" whose image can be read ({len(skipped)} failed, first: {skipped[0]})" if skipped else ""))
    log_failed_images(desc, skipped, "eval.json")
    t0 = time.perf_counter()
    clusters = route_clusters(cluster_router, records)
    rows = [{"id": r.id, "task": r.task, "source": r.source, "cluster": c, "reference": r.answer(),
             "prediction": None, "correct": None} for r, c in zip(records, clusters)]
    qa = [i for i, r in enumerate(records) if is_qa(r, qa_max_words)]
    bar = progress(len(qa) + len(records), desc, unit="rec")
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
    # n_tokens counts the closing eos: a longer reference is cut by the generation budget and
    # scores 0 whatever the model does
    cut = [rows[i]["id"] for i in qa if rows[i]["n_tokens"] - 1 > max_new_tokens]
    if cut:
        log.warning("eval: %d question-answer record(s) have a reference of more than --max-new-tokens=%d "
                    "tokens: their generation stops before the answer is complete (first: %s); raise "
                    "--max-new-tokens", len(cut), max_new_tokens, cut[0])
    return {"overall": aggregate(rows), "by_task": aggregate(rows, "task"),
            "by_source": aggregate(rows, "source"), "by_cluster": aggregate(rows, "cluster"),
            "chance": dict(chance or {}),
            "chance_oracle": oracle_chance_levels(records, skip=chance or {}, qa_max_words=qa_max_words),
            "qa_cut_short": {"n": len(cut), "max_new_tokens": max_new_tokens, "ids": cut[:20]},
            "predictions": rows, "n_records": len(rows),
            "skipped_images": {"count": len(skipped), "records": [f.to_json() for f in skipped]},
            "elapsed_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ plain text

def prefix_token_id(tokenizer) -> int:
    """The token the first text token is conditioned on: the tokenizer's bos, or its eos when
    it has no bos (lm-evaluation-harness's ``prefix_token_id`` for a Hugging Face tokenizer)."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("--text: the tokenizer has neither a bos nor an eos token to condition the first token on")
    return int(tid)


def rolling_windows(ids: Sequence[int], prefix_id: int, max_length: int) -> list[tuple[list[int], int]]:
    """lm-evaluation-harness's ``loglikelihood_rolling`` windows over a text's token ids, as
    its API models (``local-completions``) send them: ``[(window ids, n scored)]``.

    With ``max_length`` M (the harness's model argument) a request holds at most M - 1
    tokens (one position is kept for the token the API generates) and scores at most
    M - 2 of them. The first window is the prefix token followed by the first M - 2
    tokens, all scored; each later window scores the next M - 2 tokens (fewer at the
    end), conditioned on the tokens just before them that fill the window (disjoint
    scored spans: ``get_rolling_token_windows(..., context_len=1)`` then
    ``make_disjoint_window`` in ``lm_eval.utils``). Every token of ``ids`` is scored
    exactly once; the score of a window is the sum of its last n log-probabilities.
    """
    n_pred = max_length - 2
    if n_pred < 1:
        raise ValueError(f"--max-length must be >= 3 (a window needs the prefix token, a scored token and the "
                         f"harness's generated one), got {max_length}")
    ids = list(ids)
    if not ids:
        return []
    first = min(n_pred, len(ids))
    windows = [([prefix_id] + ids[:first], first)]
    done = first
    while done < len(ids):
        n = min(len(ids) - done, n_pred)
        end = done + n
        context = ids[end - n_pred - 1:end - n]  # the window's tokens before the scored ones
        windows.append((context + ids[end - n:end], n))
        done = end
    return windows


def _context_length(ensemble) -> int:
    """The experts' context in tokens (``max_position_embeddings``)."""
    ref = next(m for m in ensemble.experts if m is not None)
    n = getattr(ref.config.get_text_config(), "max_position_embeddings", None)
    if n is None:
        raise ValueError("--text: the experts' config gives no context length; pass --max-length")
    return int(n)


def count_words(text: str) -> int:
    """Words as lm-evaluation-harness counts them for ``word_perplexity``: pieces between
    runs of whitespace (``len(re.split(r"\s+", text))``; leading or trailing whitespace
    counts an empty piece, as there)."""
    return len(re.split(r"\s+", text))


def _text_stats(rows: list[dict]) -> dict[str, Any]:
    nll = sum(r["nll"] for r in rows)
    tokens, words, nbytes = (sum(r[k] for r in rows) for k in ("n_tokens", "n_words", "n_bytes"))
    return {"n": len(rows), "nll": nll, "tokens": tokens, "words": words, "bytes": nbytes,
            "nll_per_token": nll / tokens if tokens else None,
            "token_perplexity": math.exp(nll / tokens) if tokens else None,
            "word_perplexity": math.exp(nll / words) if words else None,
            "byte_perplexity": math.exp(nll / nbytes) if nbytes else None,
            "bits_per_byte": nll / nbytes / math.log(2) if nbytes else None}


def aggregate_text(rows: Sequence[dict], key: str | None = None) -> dict[str, Any]:
    """Total NLL (nats) over the texts and its perplexity per token, word and byte, overall
    (``key=None``) or per value of ``row[key]``; lm-eval's ``weighted_perplexity``:
    exp(Σ nll / Σ words), and ``bits_per_byte`` Σ nll / Σ bytes / ln 2."""
    return _by_key(rows, key, _text_stats)


def evaluate_text(ensemble, records: Sequence[Record], *, max_length: int | None = None, batch_size: int = 32,
                  desc: str = "eval") -> dict[str, Any]:
    """Perplexity of each record's reference answer as plain text under the model or the
    ensemble's mixture (eq. 24), the quantity lm-evaluation-harness's
    ``loglikelihood_rolling`` measures through ``ddfm serve``'s ``/v1/completions``.

    The text is tokenized without special tokens and without a chat template, split into
    :func:`rolling_windows` (``max_length``: default the experts' context) and each window
    scored as a token-id prompt by :meth:`~ddfm.ensemble.Ensemble.score_tokens`, the
    function the server answers ``echo`` + ``logprobs`` with, so the routing of every mode
    (a text router sees the window's text; the posterior starts afresh in each window, as
    it does for each harness request) is the server's. Returns ``{"overall", "by_task",
    "by_source", "predictions", "n_records", "max_length", "prefix_token_id", "elapsed_s"}``
    (:func:`aggregate_text` groups; per record ``nll``, ``n_tokens``, ``n_words``, ``n_bytes``).
    """
    with_image = [r for r in records if r.image is not None]
    if with_image:
        r = with_image[0]
        raise ValueError(f"--text scores plain text, but {len(with_image)} record(s) have an image (first: "
                         f"{r.file or '<in memory>'}:{r.line or 0}, id {r.id}); give a text-only test file "
                         "(ddfm prepare python-docs) or leave out --text")
    if not records:
        raise ValueError("eval --text: the test file holds no records")
    t0 = time.perf_counter()
    tok = ensemble.tokenizer
    max_length = max_length or _context_length(ensemble)
    prefix = prefix_token_id(tok)
    rows, windows = [], []  # windows: (row, ids, n scored)
    for i, r in enumerate(records):
        text = r.answer()
        ids = tok(text, add_special_tokens=False)["input_ids"]
        rows.append({"id": r.id, "task": r.task, "source": r.source, "nll": 0.0, "n_tokens": len(ids),
                     "n_words": count_words(text), "n_bytes": len(text.encode("utf-8")), "windows": 0})
        windows += [(i, w, n) for w, n in rolling_windows(ids, prefix, max_length)]
    windows.sort(key=lambda w: len(w[1]))  # similar lengths batch together
    bar = progress(len(windows), desc + " (text windows)", unit="window")
    for chunk in _batches(windows, batch_size):
        scores = ensemble.score_tokens([Request(prompt="", token_ids=w) for _, w, _ in chunk])
        for (i, _, n), s in zip(chunk, scores):
            rows[i]["nll"] -= math.fsum(s["token_logprobs"][-n:])
            rows[i]["windows"] += 1
        bar.update(len(chunk))
    bar.close()
    return {"overall": aggregate_text(rows), "by_task": aggregate_text(rows, "task"),
            "by_source": aggregate_text(rows, "source"), "predictions": rows, "n_records": len(rows),
            "max_length": max_length, "prefix_token_id": prefix, "elapsed_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ report

def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}" if x < 100 else f"{x:.1f}"


def _chance_cell(name: str, chance: dict, oracle: dict) -> str:
    if name in chance:
        return _fmt(chance[name], True)
    return f"{_fmt(oracle[name], True)} (oracle)" if name in oracle else _fmt(None)


def markdown_report(result: dict, title: str = "Evaluation") -> str:
    """Markdown tables of an :func:`evaluate` result (accuracy in %, perplexity); an oracle
    chance figure (``chance_oracle``) is marked "(oracle)" in a column named so."""
    chance, oracle = result.get("chance", {}), result.get("chance_oracle", {})
    chance_head = "oracle chance %" if oracle and not chance else "chance %"
    skipped = (result.get("skipped_images") or {}).get("count", 0)
    lines = [f"# {title}", "", f"{result['n_records']} records, {result['elapsed_s']:.1f} s"
             + (f"; {skipped} record(s) skipped: their image failed (listed in eval.json)" if skipped else ""), ""]
    o = result["overall"]
    lines += ["| overall | accuracy % | perplexity | records |", "| --- | ---: | ---: | ---: |",
              f"| all | {_fmt(o['accuracy'], True)} | {_fmt(o['perplexity'])} | {o['n']} |", ""]
    for key, label in (("by_task", "task"), ("by_source", "source"), ("by_cluster", "cluster")):
        head = chance_head if key == "by_task" else "chance %"
        lines += [f"| {label} | accuracy % | {head} | perplexity | records |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, g in result[key].items():
            c = _chance_cell(name, chance, oracle) if key == "by_task" else _fmt(None)
            lines.append(f"| {name} | {_fmt(g['accuracy'], True)} | {c} | {_fmt(g['perplexity'])} | {g['n']} |")
        lines.append("")
    cut = result.get("qa_cut_short") or {}
    if cut.get("n"):
        lines += [f"**{cut['n']} question-answer record(s) have a reference longer than max_new_tokens = "
                  f"{cut['max_new_tokens']} tokens**: generation stops before their answer is complete, so they "
                  f"count as wrong (first: {', '.join(cut['ids'][:5])}).", ""]
    if chance:
        lines.append("Chance: accuracy of always giving the train split's majority answer (prepare.json).")
    if oracle:
        lines.append("(oracle): no train split to take a chance level from, so this is the share of the "
                     "test answers that are the task's most common one: the best any constant answer can "
                     "do here. It is read off the test answers (an oracle), so it bounds a constant answer from above "
                     "and is not a chance level.")
    return "\n".join(lines)


def text_markdown_report(result: dict, title: str = "Evaluation") -> str:
    """Markdown tables of an :func:`evaluate_text` result: perplexity per word, byte and token."""
    lines = [f"# {title}: plain text", "",
             f"{result['n_records']} texts, lm-eval loglikelihood_rolling windows of max_length "
             f"{result['max_length']} (first token conditioned on token id {result['prefix_token_id']}), "
             f"{result['elapsed_s']:.1f} s", ""]
    head = ["| {} | word perplexity | byte perplexity | bits per byte | token perplexity | tokens | texts |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    groups = [("overall", {"all": result["overall"]}), ("task", result["by_task"]), ("source", result["by_source"])]
    for label, table in groups:
        lines += [head[0].format(label), head[1]]
        for name, g in table.items():
            lines.append(f"| {name} | {_fmt(g['word_perplexity'])} | {_fmt(g['byte_perplexity'])} | "
                         f"{_fmt(g['bits_per_byte'])} | {_fmt(g['token_perplexity'])} | {g['tokens']} | {g['n']} |")
        lines.append("")
    return "\n".join(lines)


def write_result(out: str | Path, result: dict, title: str, meta: dict | None = None,
                 report=markdown_report) -> Path:
    """Write eval.json (without per-record rows), predictions.jsonl and eval.md (``report``) to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "predictions.jsonl", result["predictions"])
    summary = {k: v for k, v in result.items() if k != "predictions"}
    atomic_write_text(out / "eval.md", report(result, title) + "\n")
    write_json(out / "eval.json", {**summary, **({"meta": meta} if meta else {}), "provenance": provenance()})
    return out


# ------------------------------------------------------------------------------ CLI

@dataclass
class EvalConfig:
    """``ddfm eval TEST --experts DIR... [--router FILE --mode M --top-k N] --out DIR``."""

    data: str = arg("test file in the canonical format (JSONL or LLaVA JSON list)", positional=True)
    ensemble: EnsembleConfig = arg("the model (one directory) or the ensemble (shared by generate, eval and "
                                   "serve)", default_factory=EnsembleConfig)
    out: str = arg("output directory (eval.json, eval.md, predictions.jsonl)", default="runs/eval")
    clusters: Optional[str] = arg("router file whose clusters group the results (default: --router)", default=None)
    prepare_json: Optional[str] = arg("prepare.json with chance levels (default: beside the test file)", default=None)
    qa_max_words: int = arg("a reference answer of at most this many words is scored by accuracy too "
                            "(question-answer); longer ones by perplexity only", default=QA_MAX_WORDS)
    batch_size: int = arg("requests per generate/score call", default=32)
    max_new_tokens: int = arg("tokens generated per answer at most (eval's own default: its answers are a few "
                              "words; generate and serve default to ddfm.sampling.MAX_NEW_TOKENS)",
                              default=EVAL_MAX_NEW_TOKENS)
    limit: Optional[int] = arg("evaluate only the first N records", default=None)
    text: bool = arg("score each record's reference answer as plain text (no chat template) in lm-evaluation-"
                     "harness's loglikelihood_rolling windows: perplexity per token, word and byte, as lm-eval "
                     "reports it through `ddfm serve`", default=False)
    max_length: Optional[int] = arg("--text: lm-eval's max_length model argument (requests of at most N-1 tokens, "
                                    "N-2 scored per window; default: the experts' context)", default=None)

    def __post_init__(self):
        if not self.ensemble.experts:
            raise ValueError("--experts: give one model directory or the K expert directories")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.qa_max_words < 0:
            raise ValueError(f"--qa-max-words must be >= 0 (0: perplexity only), got {self.qa_max_words}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")
        if self.max_length is not None and self.max_length < 3:
            raise ValueError(f"--max-length must be >= 3, got {self.max_length}")
        if self.max_length is not None and not self.text:
            raise ValueError("--max-length applies to --text only")
        ens = self.ensemble
        if len(ens.experts) > 1 and ens.router is None and ens.mode == "centroid":
            raise ValueError("--router is required for centroid routing of several experts "
                             "(or use --mode uniform / posterior)")


def evaluate_paths(cfg: EvalConfig) -> dict[str, Any]:
    """Load the model/ensemble and the test file named by ``cfg`` and evaluate (no files written)."""
    import torch

    torch.manual_seed(0)
    records = load_records(cfg.data, check_images=False).records  # evaluate() reports failed images
    if cfg.limit is not None:
        records = records[:cfg.limit]
    ens = Ensemble.from_config(cfg.ensemble)
    if cfg.text:
        return evaluate_text(ens, records, max_length=cfg.max_length, batch_size=cfg.batch_size,
                             desc=f"eval {Path(cfg.out).name}")
    cluster_file = cfg.clusters or cfg.ensemble.router
    cluster_router = Router.load(cluster_file) if cluster_file else None
    prepare_json = cfg.prepare_json or Path(cfg.data).parent / "prepare.json"
    chance = chance_levels(records, prepare_json, qa_max_words=cfg.qa_max_words)
    return evaluate(ens, records, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                    cluster_router=cluster_router, chance=chance, qa_max_words=cfg.qa_max_words,
                    desc=f"eval {Path(cfg.out).name}")


def evaluate_cli(cfg: EvalConfig) -> Path:
    """``ddfm eval``: evaluate and write eval.json, eval.md, predictions.jsonl to ``cfg.out``."""
    result = evaluate_paths(cfg)
    names = ", ".join(Path(e).name for e in cfg.ensemble.experts)
    title = f"Evaluation of {names} ({cfg.ensemble.mode}" + (f", top-k {cfg.ensemble.top_k}" if cfg.ensemble.top_k else "") + ")"
    out = write_result(cfg.out, result, title, meta={"config": to_dict(cfg)},
                       report=text_markdown_report if cfg.text else markdown_report)
    o = result["overall"]
    if cfg.text:
        log.info("eval --text: word perplexity %.4f, byte perplexity %.4f, token perplexity %.4f over %d texts "
                 "(%d tokens) -> %s", o["word_perplexity"], o["byte_perplexity"], o["token_perplexity"],
                 result["n_records"], o["tokens"], out / "eval.md")
        return out
    log.info("eval: accuracy %s %%, perplexity %s over %d records -> %s", _fmt(o["accuracy"], True),
             _fmt(o["perplexity"]), result["n_records"], out / "eval.md")
    return out
