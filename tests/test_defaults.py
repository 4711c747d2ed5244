"""Every command with only its required arguments, as a new user types it, on a text run
and an image run: the defaults must work for every case they are the default of.

Each run goes through the whole pipeline in a fresh working directory with the `ddfm`
command (a subprocess, as a user runs it): prepare -> embed -> partition -> init -> train
(two experts) -> generate -> eval -> tasks -> serve (one request over HTTP). The only
options given are the required ones, the choice that makes a run a text run (`--preset
tiny-lm`, a text prompt) and, so that the run fits a test, smaller sizes for `prepare` (its
defaults take every image or passage of the source) and a few steps for `train` (its
default, 200 steps of 16, takes minutes per expert here).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def ddfm(cwd: Path, *args: str) -> str:
    run = subprocess.run([sys.executable, "-m", "ddfm", *args], cwd=cwd, capture_output=True, text=True, env=ENV,
                         timeout=1800)
    assert run.returncode == 0, f"ddfm {' '.join(args)} failed:\n{run.stderr[-3000:]}"
    return run.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.load(response)


def _serve_one(cwd: Path, experts: list[str], path: str, body: dict) -> dict:
    """Start `ddfm serve` with only its required arguments (and a free port), send one request."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "ddfm", "serve", "--experts", *experts, "--router",
                               "runs/partition", "--port", str(port)], cwd=cwd, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, "ddfm serve did not come up in 300 s"
                time.sleep(0.5)
        return _post(port, path, body)
    finally:
        server.terminate()
        server.wait(timeout=60)


def _pipeline(cwd: Path, source: str, init_args: tuple[str, ...]) -> list[str]:
    ddfm(cwd, "prepare", source, "--train-size", "120", "--test-size", "12")
    ddfm(cwd, "embed", "data/mix/train.jsonl")
    ddfm(cwd, "partition", "data/mix/train.jsonl", "--features", "runs/embed", "-k", "2")
    ddfm(cwd, "init", *init_args)
    shards = sorted(p.name for p in (cwd / "runs" / "partition").glob("shard-*.jsonl"))
    assert len(shards) == 2, shards
    experts = []
    for i, shard in enumerate(shards):
        ddfm(cwd, "train", "--init", "runs/init", "--data", f"runs/partition/{shard}", "--out", f"runs/expert-{i}",
             "--steps", "4", "--batch-size", "4")
        experts.append(f"runs/expert-{i}")
    return experts


def test_image_run_with_only_required_arguments(tmp_path):
    experts = _pipeline(tmp_path, "digits", ())
    embed = json.loads((tmp_path / "runs" / "embed" / "embed.json").read_text())
    assert embed["modality"] == "image" and embed["encoder"].startswith("efficientnet-lite0")
    meta = json.loads((tmp_path / "runs" / "expert-0" / "ddfm.json").read_text())
    assert meta["trainable"]["parts"] == ["projector", "language"]  # the LLaVA recipe of the family
    image = json.loads((tmp_path / "data" / "mix" / "test.jsonl").open().readline())["image"]
    out = ddfm(tmp_path, "generate", "--prompt", "What digit is this?", "--image", f"data/mix/{image}",
               "--experts", *experts, "--router", "runs/partition")
    assert out.strip()
    ddfm(tmp_path, "eval", "data/mix/test.jsonl", "--experts", *experts, "--router", "runs/partition")
    result = json.loads((tmp_path / "runs" / "eval" / "eval.json").read_text())
    assert result["overall"]["n"] == sum(1 for _ in (tmp_path / "data" / "mix" / "test.jsonl").open())
    ddfm(tmp_path, "tasks", "--images", "data/mix/test.jsonl")
    assert (tmp_path / "runs" / "tasks" / "tasks.json").is_file()
    reply = _serve_one(tmp_path, experts, "/v1/chat/completions", {
        "model": "ddfm", "messages": [{"role": "user", "content": "What digit is this?"}]})
    assert reply["choices"][0]["message"]["role"] == "assistant"


def test_text_run_with_only_required_arguments(tmp_path):
    experts = _pipeline(tmp_path, "python-docs", ("--preset", "tiny-lm"))
    embed = json.loads((tmp_path / "runs" / "embed" / "embed.json").read_text())
    assert embed["modality"] == "text" and embed["encoder"] == "minilm"  # --encoder auto on a text corpus
    meta = json.loads((tmp_path / "runs" / "expert-0" / "ddfm.json").read_text())
    assert meta["trainable"]["parts"] == ["language"]  # a causal LM trains its one part
    out = ddfm(tmp_path, "generate", "--prompt", "How do I open a file?", "--experts", *experts,
               "--router", "runs/partition")
    assert out.strip()
    ddfm(tmp_path, "eval", "data/mix/test.jsonl", "--experts", *experts, "--router", "runs/partition")
    result = json.loads((tmp_path / "runs" / "eval" / "eval.json").read_text())
    assert result["overall"]["perplexity"] > 1
    ddfm(tmp_path, "tasks", "--docs", "data/mix/test.jsonl")
    assert (tmp_path / "runs" / "tasks" / "tasks.json").is_file()
    reply = _serve_one(tmp_path, experts, "/v1/completions", {"model": "ddfm", "prompt": "The os module"})
    assert isinstance(reply["choices"][0]["text"], str)
