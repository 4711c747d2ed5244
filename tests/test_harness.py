"""The field's evaluation harnesses through `ddfm serve`, and `ddfm eval --text`, `ddfm tasks`.

The slow tests run the real harnesses as a user does: `ddfm serve` in a subprocess on a
loopback port, `python -m lm_eval` / `python -m lmms_eval` in another, on the task files
`ddfm tasks` writes over real python-docs passages and real Fashion-MNIST images. They
need `make harness` (lm-eval, and lmms-eval without its torchvision requirements); they
skip without it, except in CI (CI=true), where a missing harness is a failure.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from ddfm.data import Record
from ddfm.evaluate import count_words, evaluate_text, prefix_token_id, rolling_windows

REPO = Path(__file__).resolve().parents[1]


def require(module: str) -> None:
    """Skip without ``module`` (``make harness`` installs it); in CI its absence fails."""
    if importlib.util.find_spec(module) is not None:
        return
    message = f"{module} is not installed (`make harness` installs the evaluation harnesses)"
    if os.environ.get("CI") == "true":
        pytest.fail("CI must run the harness tests: " + message)
    pytest.skip(message)


def env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def ddfm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ddfm", *args], check=True, env=env(), capture_output=True)


# ------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    """Held-out python-docs passages (`ddfm prepare python-docs`) and two tiny-lm experts
    from `ddfm init` (seeds 0 and 1: one tokenizer, different weights)."""
    from ddfm.init import InitConfig, init
    from ddfm.prepare import PrepareConfig, prepare

    root = tmp_path_factory.mktemp("harness-docs")
    prepare(PrepareConfig(source="python-docs", out=str(root / "data"), train_size=80, test_size=8))
    train = root / "data" / "train.jsonl"
    experts = [init(InitConfig(preset="tiny-lm", data=str(train), out=str(root / f"init-{k}"), seed=k,
                               vocab_size=512)) for k in (0, 1)]
    return {"root": root, "train": train, "test": root / "data" / "test.jsonl", "experts": [str(e) for e in experts]}


@pytest.fixture(scope="module")
def trained(docs):
    """Two experts as the method makes them: `ddfm train` from one `ddfm init`, each a few
    steps on its own half of the train passages."""
    from ddfm.train import TrainConfig, train

    root = docs["root"]
    lines = docs["train"].read_text().splitlines(keepends=True)
    experts = []
    for k in (0, 1):
        (root / f"shard-{k:02d}.jsonl").write_text("".join(lines[k::2]))
        experts.append(str(train(TrainConfig(init=docs["experts"][0], data=str(root / f"shard-{k:02d}.jsonl"),
                                             out=str(root / f"expert-{k}"), train="language", steps=4, batch_size=4,
                                             save_every=0, device="cpu", seed=k))))
    return experts


def text_records(texts: list[str]) -> list[Record]:
    return [Record(id=f"t{i}", image=None, conversations=[{"from": "human", "value": "Explain."},
                                                         {"from": "gpt", "value": t}]) for i, t in enumerate(texts)]


# ------------------------------------------------------------------------------ ddfm eval --text

def test_rolling_windows_score_every_token_once_in_lm_evals_layout():
    ids = list(range(10, 20))
    # max_length 6: requests of 5 tokens, 4 scored; later windows are filled with the tokens before
    assert rolling_windows(ids, 1, 6) == [([1, 10, 11, 12, 13], 4), ([13, 14, 15, 16, 17], 4),
                                          ([15, 16, 17, 18, 19], 2)]
    assert rolling_windows(ids, 1, 100) == [([1] + ids, 10)]
    assert rolling_windows([], 1, 6) == []
    for n in range(1, 30):
        for m in (3, 4, 7):
            windows = rolling_windows(list(range(n)), -1, m)
            assert sum(k for _, k in windows) == n and all(len(w) <= m - 1 for w, _ in windows)
            assert [t for w, k in windows for t in w[len(w) - k:]] == list(range(n))
    with pytest.raises(ValueError, match="max-length must be >= 3"):
        rolling_windows(ids, 1, 2)


def test_rolling_windows_equal_lm_evals_own():
    require("lm_eval")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, 50, rng.integers(0, 40)).tolist()
        max_length = int(rng.integers(3, 12))
        # TemplateAPI.loglikelihood_rolling: self.max_length = max_length - 1, windows of max_seq_len - 1
        theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=ids, prefix_token=7, max_seq_len=max_length - 2, context_len=1)]
        assert rolling_windows(ids, 7, max_length) == [(c + x, len(x)) for c, x in theirs]


def test_eval_text_is_each_texts_log_likelihood_after_the_prefix_token(docs):
    """One expert, one window: the NLL is plain transformers' -Σ log p(x_t | bos, x_<t); small
    windows score every token once too, and words and bytes are counted as lm-eval does."""
    import torch
    from transformers import AutoModelForCausalLM

    from ddfm.ensemble import Ensemble

    ens = Ensemble.from_pretrained(docs["experts"][:1])
    texts = ["The json module encodes Python objects as JSON text.", " two  spaces\tand a tab\n"]
    result = evaluate_text(ens, text_records(texts), batch_size=2)
    model = AutoModelForCausalLM.from_pretrained(docs["experts"][0]).eval()
    tok = ens.tokenizer
    assert prefix_token_id(tok) == tok.bos_token_id
    for text, row in zip(texts, result["predictions"]):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([[tok.bos_token_id] + ids])).logits[0].double().log_softmax(-1)
        nll = -sum(logp[t, ids[t]].item() for t in range(len(ids)))
        assert row["nll"] == pytest.approx(nll, rel=1e-5) and row["n_tokens"] == len(ids) and row["windows"] == 1
        assert row["n_words"] == count_words(text) and row["n_bytes"] == len(text.encode())
    assert count_words(texts[1]) == 7  # leading and trailing whitespace count an empty word, as in lm-eval
    o = result["overall"]
    nll = sum(r["nll"] for r in result["predictions"])
    assert o["word_perplexity"] == pytest.approx(math.exp(nll / o["words"]))
    assert o["bits_per_byte"] == pytest.approx(nll / o["bytes"] / math.log(2))
    small = evaluate_text(ens, text_records(texts), max_length=5)
    assert [r["windows"] for r in small["predictions"]] == [math.ceil(r["n_tokens"] / 3) for r in small["predictions"]]
    assert small["overall"]["tokens"] == o["tokens"] and small["overall"]["nll"] != pytest.approx(o["nll"])


def test_eval_text_refuses_records_with_images(docs, tmp_path):
    from ddfm.cli import main

    row = {"id": "img-1", "image": "x.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                             {"from": "gpt", "value": "a shoe"}]}
    (tmp_path / "test.jsonl").write_text(json.dumps(row) + "\n")
    from ddfm.data import load_records
    from ddfm.ensemble import Ensemble

    with pytest.raises(ValueError, match=r"--text scores plain text, but 1 record\(s\) have an image .*test.jsonl:1"):
        evaluate_text(Ensemble.from_pretrained(docs["experts"][:1]),
                      load_records(tmp_path / "test.jsonl", check_images=False).records)
    assert main(["eval", str(docs["test"]), "--experts", docs["experts"][0], "--max-length", "64"]) == 2


def test_a_token_id_prompt_routes_on_its_text_under_a_text_router(docs, tmp_path):
    """lm-eval sends token ids: a text router must see their text, not an empty prompt."""
    from safetensors.numpy import save_file

    from ddfm.ensemble import Ensemble, Request
    from ddfm.features.registry import get_encoder

    enc = get_encoder("minilm")
    centroids = enc.encode(["Sockets, servers and network protocols.", "Lists, tuples and dictionaries."])
    save_file({"centroids": np.asarray(centroids, np.float32)}, str(tmp_path / "router.safetensors"))
    (tmp_path / "router.json").write_text(json.dumps({
        "k": 2, "temperature": 20.0, "top_k": 1, "encoder": enc.spec, "modality": "text", "dim": centroids.shape[1],
        "centroids": "router.safetensors", "cluster_shares": [0.5, 0.5], "algorithm": {"name": "test-fixture"}}))
    ens = Ensemble.from_pretrained(docs["experts"], tmp_path / "router.json", mode="centroid", top_k=1)
    texts = ["The socket module opens a network server.", "A dictionary maps keys to values; a list holds items."]
    ids = [ens.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    by_text = ens.route([Request(prompt=t, raw=True) for t in texts])
    by_ids = ens.route([Request(prompt="", token_ids=i) for i in ids])
    assert by_text.argmax(1).tolist() == [0, 1]
    assert torch_close(by_ids, by_text)
    # a gateway has no tokenizer: token ids under its text router are a 400 naming the field
    from ddfm.ensemble.config import EnsembleConfig
    from ddfm.router import Router
    from ddfm.serve.cli import ServeConfig
    from ddfm.serve.errors import ApiError
    from ddfm.serve.gateway import GatewayBackend

    gw = GatewayBackend(Router.load(tmp_path / "router.json"), {0: "http://127.0.0.1:9/v1", 1: "http://127.0.0.1:9/v1"},
                        ServeConfig(upstream=["0=http://127.0.0.1:9/v1", "1=http://127.0.0.1:9/v1"],
                                    ensemble=EnsembleConfig(router=str(tmp_path / "router.json"))))
    assert np.argmax(gw._route(Request(prompt=texts[1], raw=True))) == 1
    with pytest.raises(ApiError) as err:
        gw._route(Request(prompt="", token_ids=ids[0]))
    assert err.value.status == 400 and err.value.param == "prompt" and "token ids" in str(err.value)


def torch_close(a, b) -> bool:
    return bool(np.allclose(np.asarray(a), np.asarray(b), atol=1e-6))


# ------------------------------------------------------------------------------ ddfm tasks

def test_tasks_are_the_records_text_and_a_fair_multiple_choice(docs, tmp_path, capsys):
    import yaml

    from ddfm.cli import main
    from ddfm.data import load_records

    out = tmp_path / "tasks"
    assert main(["tasks", "--docs", str(docs["test"]), "--out", str(out), "--choices", "3", "--seed", "5"]) == 0
    records = load_records(docs["test"]).records
    rows = [json.loads(x) for x in (out / "lm-eval" / "docs.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == [r.answer() for r in records]  # what `ddfm eval --text` scores
    task = yaml.safe_load((out / "lm-eval" / "ddfm_docs.yaml").read_text())
    assert task["output_type"] == "loglikelihood_rolling" and task["doc_to_target"] == "text"
    assert Path(task["dataset_kwargs"]["data_files"]["test"]) == (out / "lm-eval" / "docs.jsonl").resolve()
    match = [json.loads(x) for x in (out / "lm-eval" / "docs_match.jsonl").read_text().splitlines()]
    page = {r.answer(): r.extra["doc"] for r in records}
    for r, m in zip(records, match):
        assert m["query"] == r.prompt() and len(m["choices"]) == 3 and m["choices"][m["gold"]] == r.answer()
        assert all(page[c] != r.extra["doc"] for i, c in enumerate(m["choices"]) if i != m["gold"])
    assert len({m["gold"] for m in match}) > 1  # the right answer is not always in one place
    again = tmp_path / "again"
    assert main(["tasks", "--docs", str(docs["test"]), "--out", str(again), "--choices", "3", "--seed", "5"]) == 0
    assert (again / "lm-eval" / "docs_match.jsonl").read_text() == (out / "lm-eval" / "docs_match.jsonl").read_text()
    assert main(["tasks", "--out", str(tmp_path / "x")]) == 2
    assert "give --docs" in capsys.readouterr().err
    assert main(["tasks", "--docs", str(docs["test"]), "--out", str(tmp_path / "y"), "--choices", "9"]) == 2
    assert "passages from other pages" in capsys.readouterr().err


def test_lmms_task_scores_by_the_same_vqa_normalisation_as_ddfm_eval(tmp_path):
    require("lmms_eval")
    from ddfm.harness import IMAGES_UTILS
    from ddfm.vqa import exact_match

    (tmp_path / "utils.py").write_text(IMAGES_UTILS)
    spec = importlib.util.spec_from_file_location("ddfm_images_utils", tmp_path / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    references = ["sneaker", "ankle boot", "tops", "yes", "no", "7", "even", "a faint shirt", "t-shirt/top"]
    predictions = ["A sneaker.", "an ankle boot", "Tops!", "Yes", "no.", "seven", "Even", "faint shirt", "T-shirt/top",
                   "the  sneaker", "shoe", "dont", "3.5", "Seven."]
    for p in predictions:
        for r in references:
            got = utils.process_results({"answer": r}, [p])["exact_match"]
            assert got == float(exact_match(p, r)), (p, r)


# ------------------------------------------------------------------------------ the harnesses, end to end

class Served:
    """`ddfm serve` in a subprocess on a free loopback port."""

    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "ddfm", "serve", *args, "--port", str(self.port),
                                      "--log-level", "warning"], env=env())
        deadline = time.monotonic() + 180
        while True:
            assert self.proc.poll() is None, "ddfm serve exited"
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "ddfm serve did not come up"
                time.sleep(0.5)

    def close(self):
        self.proc.terminate()
        self.proc.wait(60)


def run_harness(module: str, args: list[str], out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", module, *args, "--output_path", str(out), "--log_samples"],
                          env={**env(), "HF_DATASETS_CACHE": str(out / "datasets-cache")},
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return out


def samples(out: Path, task: str) -> list[dict]:
    [path] = glob.glob(str(out / "**" / f"*samples_{task}*.jsonl"), recursive=True)
    return sorted((json.loads(x) for x in Path(path).read_text().splitlines()), key=lambda s: s["doc_id"])


def run_lm_eval(server: Served, tokenizer: str, tasks: str, include: Path, max_length: int, out: Path) -> Path:
    return run_harness("lm_eval", [
        "--model", "local-completions", "--tasks", tasks, "--include_path", str(include),
        "--model_args", f"model=ddfm,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,"
                        f"tokenizer={tokenizer},max_length={max_length},max_retries=1"], out)


def results(out: Path) -> dict:
    [path] = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())["results"]


@pytest.mark.slow
def test_lm_eval_perplexity_through_ddfm_serve_equals_ddfm_eval(docs, trained):
    """lm-eval's local-completions against `ddfm serve` (K = 2, posterior routing): its word and
    byte perplexity of the held-out passages are `ddfm eval --text`'s to 1e-4, document by
    document; its multiple-choice log-likelihoods are the ensemble's mixture."""
    require("lm_eval")
    from ddfm.ensemble import Ensemble, Request

    root, experts = docs["root"], trained
    tasks = root / "tasks" / "lm-eval"
    ddfm("tasks", "--docs", str(docs["test"]), "--out", str(root / "tasks"), "--limit", "6")
    server = Served("--experts", *experts, "--mode", "posterior")
    try:
        # short windows (max_length 128): passages span several, and the windows must match too
        ppl = run_lm_eval(server, experts[0], "ddfm_docs", tasks, 128, root / "lm-eval-ppl")
        # multiple choice at the experts' context: a question and a whole passage fit one request
        mc = run_lm_eval(server, experts[0], "ddfm_docs_match", tasks, 1024, root / "lm-eval-mc")
    finally:
        server.close()
    ddfm("eval", str(docs["test"]), "--experts", *experts, "--mode", "posterior", "--text", "--limit", "6",
         "--max-length", "128", "--out", str(root / "eval-text"))
    ours = json.loads((root / "eval-text" / "eval.json").read_text())
    rows = ours_rows(root)
    assert ours["n_records"] == 6 and max(r["windows"] for r in rows) > 1
    theirs = results(ppl)["ddfm_docs"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert theirs[f"{metric},none"] == pytest.approx(ours["overall"][metric], rel=1e-4, abs=0)
    for s, row in zip(samples(ppl, "ddfm_docs"), rows):
        assert -float(s["resps"][0][0]) == pytest.approx(row["nll"], rel=1e-4, abs=1e-4)
    # multiple choice: each choice's log-likelihood after the question is the mixture's
    ens = Ensemble.from_pretrained(experts, mode="posterior")
    tok = ens.tokenizer
    correct = []
    for s in samples(mc, "ddfm_docs_match"):
        doc = s["doc"]
        ctx = tok(doc["query"], add_special_tokens=False)["input_ids"]
        want = []
        for choice in doc["choices"]:
            ids = tok(doc["query"] + "\n" + choice, add_special_tokens=False)["input_ids"]
            [score] = ens.score_tokens([Request(prompt="", token_ids=ids)])
            want.append(math.fsum(score["token_logprobs"][len(ctx):]))
        got = [float(r[0][0]) for r in s["resps"]]
        assert np.allclose(got, want, rtol=0, atol=1e-3), (got, want)
        correct.append(int(np.argmax(want)) == doc["gold"])
    assert results(mc)["ddfm_docs_match"]["acc,none"] == pytest.approx(np.mean(correct))


def ours_rows(root: Path) -> list[dict]:
    return [json.loads(x) for x in (root / "eval-text" / "predictions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Real Fashion-MNIST test images (`ddfm prepare`), a K = 2 pixel router (`ddfm embed`,
    `ddfm partition`) and two tiny-llava experts from `ddfm init` (seeds 0 and 1, untrained:
    the two answer differently, so a wrong route shows; experts trained for the seconds a
    test affords answer every image alike)."""
    root = tmp_path_factory.mktemp("harness-images")
    ddfm("prepare", "fashion-mnist", "--out", str(root / "data"), "--train-size", "40", "--test-size", "6")
    ddfm("embed", str(root / "data" / "train.jsonl"), "--encoder", "pixels", "--out", str(root / "features"))
    ddfm("partition", str(root / "data" / "train.jsonl"), "--features", str(root / "features"), "-k", "2",
         "--out", str(root / "partition"))
    for k in (0, 1):
        ddfm("init", "--preset", "tiny-llava", "--data", str(root / "data" / "train.jsonl"),
             "--out", str(root / f"expert-{k}"), "--seed", str(k), "--vocab-size", "400")
    return {"root": root, "test": root / "data" / "test.jsonl", "router": str(root / "partition"),
            "experts": [str(root / f"expert-{k}") for k in (0, 1)]}


@pytest.mark.slow
def test_lmms_eval_answers_through_ddfm_serve_are_the_ensembles(images):
    """lmms-eval's openai_compatible model against `ddfm serve` (K = 2, centroid router, top-1)
    on the ddfm_images task: every answer is the ensemble's greedy answer to that image and
    question, and its exact-match score is `ddfm eval`'s accuracy on the same records."""
    require("lmms_eval")
    from ddfm.data import load_records
    from ddfm.ensemble import Ensemble
    from ddfm.evaluate import evaluate

    root = images["root"]
    ddfm("tasks", "--images", str(images["test"]), "--out", str(root / "tasks"))
    server = Served("--experts", *images["experts"], "--router", images["router"], "--max-output-tokens", "12")
    try:
        out = run_harness("lmms_eval", [
            "--model", "openai_compatible", "--tasks", "ddfm_images", "--batch_size", "1",
            "--include_path", str(root / "tasks" / "lmms-eval"),
            "--model_args", f"model_version=ddfm,base_url={server.url}/v1,api_key=unused,num_concurrent=4,"
                            "max_retries=1"], root / "lmms-eval-out")
    finally:
        server.close()
    got = samples(out, "ddfm_images")
    rows = [json.loads(x) for x in (root / "tasks" / "lmms-eval" / "images.jsonl").read_text().splitlines()]
    by_id = {r.id: r for r in load_records(images["test"]).records}
    records = [by_id[r["id"]] for r in rows]
    ens = Ensemble.from_pretrained(images["experts"], images["router"], mode="centroid", top_k=1)
    ours = evaluate(ens, records, max_new_tokens=12, qa_max_words=100)
    assert len(got) == len(records) == ours["n_records"] > 10
    predictions = [p["prediction"] for p in ours["predictions"]]
    answers = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"] for s in got]
    assert [a.strip() for a in answers] == predictions
    # the two experts answer differently, so each answer shows where its image was routed
    # (an image lost on the way would be routed by the cluster shares alone: one expert for all)
    assert len(set(predictions)) >= 2
    [path] = glob.glob(str(out / "**" / "*_results.json"), recursive=True)
    score = json.loads(Path(path).read_text())["results"]["ddfm_images"]["exact_match,none"]
    assert score == pytest.approx(ours["overall"]["accuracy"])
