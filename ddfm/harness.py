"""Task files for the field's evaluation harnesses, from ddfm's own prepared test data.

    ddfm tasks --docs data/docs/test.jsonl --images data/mix/test.jsonl --out runs/tasks

lm-evaluation-harness and lmms-eval evaluate any OpenAI-compatible server, so they evaluate
the ensemble through ``ddfm serve`` (``/v1/completions`` for log-likelihoods,
``/v1/chat/completions`` for answers to images). Their tasks are YAML files over a data
set; this stage writes such tasks over local JSON Lines, nothing from a hub:

* ``lm-eval/ddfm_docs.yaml`` — ``loglikelihood_rolling`` over the reference answers of a
  text-only test file (the held-out python-docs passages): lm-eval's ``word_perplexity``,
  ``byte_perplexity`` and ``bits_per_byte``. ``ddfm eval --text`` on the same test file
  computes the same quantity (the same text, :meth:`Record.answer`; the same windows,
  :func:`ddfm.evaluate.rolling_windows`).
* ``lm-eval/ddfm_docs_match.yaml`` — multiple choice from the same passages: after a record's
  question ("Explain json (json - JSON encoder and decoder)."), which of ``choices``
  passages answers it: its own, or one from another page of the docs (distractors drawn
  with ``seed``). A text-only language model can answer it from what the passages say;
  lm-eval reports ``acc`` and ``acc_norm`` (log-likelihood per byte).
* ``lmms-eval/ddfm_images.yaml`` (+ ``utils.py``) — the short-answer records of an image
  test file (Fashion-MNIST, digits: naming, category, yes/no, ...), scored by exact match
  after VQA's answer normalisation (lmms-eval's own ``EvalAIAnswerProcessor``, the one its
  VQAv2 task uses; ``ddfm eval`` scores the same records with :mod:`ddfm.vqa`).

Paths inside the written files are absolute, so the harnesses run from any directory:
``lm_eval --include_path runs/tasks/lm-eval --tasks ddfm_docs,ddfm_docs_match ...`` and
``lmms-eval --include_path runs/tasks/lmms-eval --tasks ddfm_images ...`` (README).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ddfm.config import arg
from ddfm.data import IMAGE_TOKEN, Record, check_images, load_records
from ddfm.evaluate import QA_MAX_WORDS, is_qa
from ddfm.io import atomic_write_text, write_json, write_jsonl

log = logging.getLogger(__name__)

__all__ = ["TasksConfig", "write_tasks", "docs_rows", "docs_match_rows", "image_rows"]

DOCS_TASK, MATCH_TASK, IMAGES_TASK = "ddfm_docs", "ddfm_docs_match", "ddfm_images"

DOCS_YAML = """\
# written by `ddfm tasks`: perplexity of {source}'s reference answers as plain text
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

MATCH_YAML = """\
# written by `ddfm tasks`: which passage answers the question ({source})
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: query
doc_to_choice: choices
doc_to_target: gold
target_delimiter: "\\n"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

IMAGES_YAML = """\
# written by `ddfm tasks`: short answers to the images of {source}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# lmms-eval imports this module from the task's directory (`!function utils.x`); it needs
# nothing but lmms-eval and Pillow, so it runs wherever lmms-eval is installed.
IMAGES_UTILS = '''\
"""lmms-eval hooks of the ddfm_images task (written by `ddfm tasks`)."""

from PIL import Image

from lmms_eval.tasks._task_utils.vqa_eval_metric import EvalAIAnswerProcessor

_VQA = EvalAIAnswerProcessor()


def doc_to_visual(doc):
    with Image.open(doc["image"]) as img:
        return [img.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def normalize(answer):
    """VQA's answer normalisation (the disagreeing-panel branch of vqaEval.py), as lmms-eval's VQAv2 task."""
    answer = answer.replace("\\n", " ").replace("\\t", " ").strip()
    return _VQA.process_digit_article(_VQA.process_punctuation(answer))


def process_results(doc, results):
    return {"exact_match": float(normalize(results[0]) == normalize(doc["answer"]))}
'''


# ------------------------------------------------------------------------------ rows

def docs_rows(records: Sequence[Record]) -> list[dict[str, Any]]:
    """One row per text-only record: ``{"id", "task", "source", "text"}``, text = the
    reference answer (:meth:`Record.answer`, what ``ddfm eval --text`` scores)."""
    return [{"id": r.id, "task": r.task, "source": r.source, "text": r.answer()} for r in records]


def docs_match_rows(records: Sequence[Record], n_choices: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Multiple-choice rows ``{"id", "query", "choices", "gold"}``: the record's question,
    its own passage and ``n_choices - 1`` passages of records from other pages (the
    ``doc`` field, else the task), in a seeded random order; ``gold`` indexes the own one."""
    if n_choices < 2:
        raise ValueError(f"--choices must be >= 2, got {n_choices}")
    page = [str(r.extra.get("doc") or r.task) for r in records]
    rng = np.random.default_rng(seed)
    rows = []
    for i, r in enumerate(records):
        others = [j for j in range(len(records)) if page[j] != page[i]]
        if len(others) < n_choices - 1:
            raise ValueError(f"--choices {n_choices}: record {r.id} has only {len(others)} passages from other "
                             "pages to draw distractors from; give a larger test file or fewer choices")
        picked = [i] + [int(j) for j in rng.choice(others, n_choices - 1, replace=False)]
        order = rng.permutation(n_choices)
        choices = [records[picked[k]].answer() for k in order]
        rows.append({"id": r.id, "task": r.task, "query": r.prompt().replace(IMAGE_TOKEN, "").strip(),
                     "choices": choices, "gold": int(np.flatnonzero(order == 0)[0])})
    return rows


def image_rows(records: Sequence[Record], qa_max_words: int = QA_MAX_WORDS,
               tasks: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The question-answer records with an image (:func:`ddfm.evaluate.is_qa`), optionally
    of ``tasks`` only: ``{"id", "task", "source", "image" (absolute path), "question" (the
    first human turn, the ``<image>`` placeholder removed), "answer"}``."""
    rows = []
    for r in records:
        if r.image_path is None or not is_qa(r, qa_max_words) or (tasks and r.task not in tasks):
            continue
        if len(r.conversations) > 2:
            raise ValueError(f"{r.file}:{r.line}: record {r.id} has {len(r.conversations)} turns; the harness task "
                             "asks one question per image")
        rows.append({"id": r.id, "task": r.task, "source": r.source, "image": str(r.image_path.resolve()),
                     "question": r.prompt().replace(IMAGE_TOKEN, "").strip(), "answer": r.answer()})
    return rows


# ------------------------------------------------------------------------------ stage

@dataclass
class TasksConfig:
    """``ddfm tasks --docs TEXT_TEST --images IMAGE_TEST --out DIR``."""

    docs: Optional[str] = arg("text-only test file (ddfm prepare python-docs: test.jsonl) -> lm-eval tasks "
                              "ddfm_docs (perplexity) and ddfm_docs_match (multiple choice)", default=None)
    images: Optional[str] = arg("test file with images (ddfm prepare mix / fashion-mnist / digits) -> lmms-eval "
                                "task ddfm_images (short answers, exact match)", default=None)
    out: str = arg("output directory (lm-eval/, lmms-eval/, tasks.json)", default="runs/tasks")
    choices: int = arg("ddfm_docs_match: passages to choose from per question", default=4)
    seed: int = arg("ddfm_docs_match: seed of the distractors and their order", default=0)
    image_tasks: list[str] = arg("ddfm_images: only records of these tasks (default: every short-answer task)",
                                 default_factory=list)
    qa_max_words: int = arg("ddfm_images: a reference of at most this many words is a short answer",
                            default=QA_MAX_WORDS)
    max_new_tokens: int = arg("ddfm_images: tokens generated per answer at most", default=12)
    limit: Optional[int] = arg("use only the first N records of each file", default=None)

    def __post_init__(self):
        if self.docs is None and self.images is None:
            raise ValueError("give --docs (a text-only test file), --images (a test file with images) or both")
        if self.choices < 2:
            raise ValueError(f"--choices must be >= 2, got {self.choices}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {self.limit}")


def _yaml_string(path: Path) -> str:
    return json.dumps(str(path))  # a JSON string is a YAML string: any path, quoted


def _load(path: str, limit: int | None) -> list[Record]:
    records = load_records(path, check_images=False).records
    return records[:limit] if limit is not None else records


def _write_docs(cfg: TasksConfig, out: Path) -> dict[str, Any]:
    records = _load(cfg.docs, cfg.limit)
    with_image = [r for r in records if r.image is not None]
    if with_image:
        r = with_image[0]
        raise ValueError(f"--docs {cfg.docs}: {len(with_image)} record(s) have an image (first: line {r.line}, id "
                         f"{r.id}); the lm-eval tasks are text-only (ddfm prepare python-docs)")
    if not records:
        raise ValueError(f"--docs {cfg.docs}: no records")
    data, match = out / "docs.jsonl", out / "docs_match.jsonl"
    write_jsonl(data, docs_rows(records))
    write_jsonl(match, docs_match_rows(records, cfg.choices, cfg.seed))
    source = Path(cfg.docs).resolve()
    atomic_write_text(out / f"{DOCS_TASK}.yaml", DOCS_YAML.format(task=DOCS_TASK, data=_yaml_string(data.resolve()), source=source))
    atomic_write_text(out / f"{MATCH_TASK}.yaml", MATCH_YAML.format(task=MATCH_TASK, data=_yaml_string(match.resolve()),
                                                                     source=source))
    return {DOCS_TASK: {"harness": "lm-eval", "data": str(data), "docs": len(records), "from": str(source)},
            MATCH_TASK: {"harness": "lm-eval", "data": str(match), "docs": len(records), "choices": cfg.choices,
                         "seed": cfg.seed, "from": str(source)}}


def _write_images(cfg: TasksConfig, out: Path) -> dict[str, Any]:
    records, failed = check_images(_load(cfg.images, cfg.limit))
    for f in failed[:5]:
        log.warning("tasks: left out %s", f)
    rows = image_rows(records, cfg.qa_max_words, cfg.image_tasks or None)
    if not rows:
        raise ValueError(f"--images {cfg.images}: no short-answer records with a readable image"
                         + (f" of tasks {cfg.image_tasks}" if cfg.image_tasks else ""))
    data = out / "images.jsonl"
    write_jsonl(data, rows)
    source = Path(cfg.images).resolve()
    atomic_write_text(out / f"{IMAGES_TASK}.yaml", IMAGES_YAML.format(
        task=IMAGES_TASK, data=_yaml_string(data.resolve()), source=source, max_new_tokens=cfg.max_new_tokens))
    atomic_write_text(out / "utils.py", IMAGES_UTILS)
    tasks = sorted({r["task"] for r in rows})
    return {IMAGES_TASK: {"harness": "lmms-eval", "data": str(data), "docs": len(rows), "tasks": tasks,
                          "left_out_images": len(failed), "max_new_tokens": cfg.max_new_tokens, "from": str(source)}}


def write_tasks(cfg: TasksConfig) -> Path:
    """``ddfm tasks``: write the harness task directories and ``tasks.json`` (what is where)."""
    out = Path(cfg.out)
    written: dict[str, Any] = {}
    if cfg.docs is not None:
        (out / "lm-eval").mkdir(parents=True, exist_ok=True)
        written.update(_write_docs(cfg, out / "lm-eval"))
    if cfg.images is not None:
        (out / "lmms-eval").mkdir(parents=True, exist_ok=True)
        written.update(_write_images(cfg, out / "lmms-eval"))
    write_json(out / "tasks.json", written)
    for name, info in written.items():
        log.info("tasks: %s (%s, %d docs) -> %s", name, info["harness"], info["docs"], Path(info["data"]).parent)
    return out
