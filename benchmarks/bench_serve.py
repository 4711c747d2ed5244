"""Throughput and latency of `ddfm serve` vs calling Ensemble.generate directly, in one run.

    .venv/bin/python benchmarks/bench_serve.py                      # tiny experts built here
    .venv/bin/python benchmarks/bench_serve.py --experts runs/expert-0 runs/expert-1 \\
        --router runs/partition/router.json --requests 64 --max-tokens 4 8 16 32

The reference is the Python API in a loop: one ``Ensemble.generate`` call per request,
one request at a time (what a user without the server would write). The server is
``ddfm serve`` started as a subprocess on a free 127.0.0.1 port and driven over HTTP by
an asyncio client at concurrency 1, 8 and 32. Both sides answer the same N requests
(greedy, each with its own ``max_tokens``, cycling through ``--max-tokens``: mixed
lengths) and each is timed as what a user waits for: the wall time from the first request
to the last answer. The server's continuous batcher lets requests join and leave the
running batch at token boundaries, so its requests/s should pass the loop's as
concurrency grows, while at concurrency 1 the ratio shows the HTTP + JSON overhead. A last
row repeats concurrency 32 with identical ``max_tokens`` (``--same-max-tokens``), the
setting of the figure before continuous batching. Rows are measured in interleaved rounds
(direct, c=1, c=8, c=32, ..., direct, ...) so that load from other processes on a shared
machine falls on all of them alike; the ratio of each row is taken per round (against the
same round's loop) and the median and best over rounds are printed. Each side uses one
torch thread. Everything is bounded (``--rounds`` x ``--requests`` per row) and stays on
loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from common import fmnist_images, write_image_records  # noqa: E402


def build_tiny_ensemble(root: Path, images) -> tuple[list[str], str]:
    """Two untrained tiny-llava experts (ddfm init) and a K=2 pixel-feature router."""
    from safetensors.numpy import save_file

    from ddfm.embed import get_encoder
    from ddfm.models import InitConfig, init

    data = write_image_records(root, images)
    experts = [str(init(InitConfig(preset="tiny-llava", data=str(data),
                                   out=str(root / f"expert-{s}"), seed=s, vocab_size=300))) for s in (0, 1)]
    enc = get_encoder("pixels")
    save_file({"centroids": enc.encode(images[:2]).astype(np.float32)}, str(root / "router.safetensors"))
    (root / "router.json").write_text(json.dumps({
        "k": 2, "temperature": 20.0, "top_k": 1, "encoder": enc.spec, "modality": "image", "dim": enc.dim,
        "centroids": "router.safetensors", "cluster_shares": [0.5, 0.5], "algorithm": {"name": "bench"}}))
    return experts, str(root / "router.json")


def data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def summary(latencies: list[float], wall: float) -> dict[str, float]:
    lat = np.asarray(latencies)
    return {"rps": len(lat) / wall, "p50_ms": 1000 * float(np.percentile(lat, 50)),
            "p99_ms": 1000 * float(np.percentile(lat, 99))}


def direct_round(ens, images, lengths: list[int]) -> tuple[list[float], float, int]:
    """One ``Ensemble.generate`` call per request: (latencies, wall seconds, tokens generated)."""
    from ddfm.ensemble import Request

    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for i, n in enumerate(lengths):
        t = time.perf_counter()
        [gen] = ens.generate(Request(prompt="What is this?", image=images[i % len(images)]), max_new_tokens=n,
                             do_sample=False)
        latencies.append(time.perf_counter() - t)
        tokens += gen.completion_tokens
    return latencies, time.perf_counter() - t0, tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(experts, router, port: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ddfm", "serve", "--experts", *experts, "--router", router, "--port", str(port),
           "--max-batch-size", str(max_batch), "--max-concurrent", "256", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ddfm serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("ddfm serve did not come up in 120 s")


async def server_round(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], float, int]:
    """The bodies sent with at most ``concurrency`` in flight: (latencies, wall seconds, tokens generated)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(body):
            nonlocal tokens
            async with sem:
                t = time.perf_counter()
                resp = await client.post(url, json=body)
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t)
                tokens += resp.json()["usage"]["completion_tokens"]

        await one({**bodies[0], "max_tokens": 1})  # open the connection
        latencies.clear()
        tokens = 0
        busy = await batcher_busy(client, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        wall = time.perf_counter() - t0
        print(f"  c={concurrency}: {len(bodies) / wall:.1f} req/s, batcher thread busy "
              f"{100 * (await batcher_busy(client, url) - busy) / wall:.0f} % of the wall time", flush=True)
        return latencies, wall, tokens


async def batcher_busy(client, url: str) -> float:
    """``ddfm_batcher_busy_seconds_total`` from the server's /metrics."""
    text = (await client.get(url.replace("/v1/chat/completions", "/metrics"))).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("ddfm_batcher_busy_seconds_total ")))


def chat_bodies(images, lengths: list[int]) -> list[dict]:
    return [{"model": "ddfm", "max_tokens": n, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(images[i % len(images)])}}]}]}
            for i, n in enumerate(lengths)]


def report(rows: dict[str, list], args, n_experts: int) -> None:
    """Per row: requests/s and latency over all rounds, and the ratio to the same round's loop."""
    print(f"\n{args.rounds} rounds x {args.requests} requests per row, greedy, max_tokens cycling "
          f"{args.max_tokens} (mixed) unless marked, {n_experts} experts (top-1), 1 torch thread per side, "
          f"{os.cpu_count()} CPU cores, loopback; wall time from the first request to the last answer")
    print(f"{'':38s} {'req/s':>7s} {'p50 ms':>8s} {'p99 ms':>8s} {'tokens':>7s}   {'ratio: median':>13s} {'best':>6s}")
    for name, rounds in rows.items():
        lat = [x for r in rounds for x in r[0]]
        s = summary(lat, sum(r[1] for r in rounds))
        tokens = rounds[0][2]
        line = f"{name:38s} {s['rps']:7.2f} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f} {tokens:7d}"
        ref = rows["direct" if "same" not in name else "direct, same max_tokens"]
        if rounds is not ref:
            ratios = [ref_r[1] / r[1] for r, ref_r in zip(rounds, ref)]  # same requests: time ratio = rps ratio
            line += f"   {float(np.median(ratios)):12.2f}x {max(ratios):5.2f}x"
        print(line)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", nargs="*", default=None, help="expert directories (default: build tiny ones)")
    p.add_argument("--router", default=None, help="router.json (with --experts)")
    p.add_argument("--requests", type=int, default=128, help="requests per row and round (4 times the largest "
                   "concurrency: a steady state, not only the first wave and its tail)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all rows")
    p.add_argument("--max-tokens", type=int, nargs="+", default=[4, 8, 16, 32],
                   help="max_tokens of the requests, cycled (mixed lengths)")
    p.add_argument("--same-max-tokens", type=int, default=8, help="max_tokens of the identical-lengths row (0: skip)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=32)
    args = p.parse_args(argv)

    # One torch thread on both sides: the comparison is of the serving path, not of how
    # two processes share the cores (the server runs in a subprocess with OMP_NUM_THREADS=1).
    import torch

    from ddfm.ensemble import Ensemble, Request

    torch.set_num_threads(1)
    images = fmnist_images(32)
    mixed = [args.max_tokens[i % len(args.max_tokens)] for i in range(args.requests)]
    same = [args.same_max_tokens] * args.requests
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        experts, router = (args.experts, args.router) if args.experts else build_tiny_ensemble(Path(tmp), images)
        ens = Ensemble.from_pretrained(experts, router, mode="centroid", top_k=1)
        ens.generate(Request(prompt="What is this?", image=images[0]), max_new_tokens=4)  # warm-up
        port = free_port()
        proc = start_server(experts, router, port, args.max_batch_size)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            # rounds interleave the rows, so drifting load on a shared machine hits them alike
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                rows.setdefault("direct", []).append(direct_round(ens, images, mixed))
                for c in args.concurrency:
                    rows.setdefault(f"ddfm serve, concurrency {c}", []).append(
                        asyncio.run(server_round(url, chat_bodies(images, mixed), c)))
                if args.same_max_tokens:
                    rows.setdefault("direct, same max_tokens", []).append(direct_round(ens, images, same))
                    rows.setdefault("ddfm serve, concurrency 32, same max_tokens", []).append(
                        asyncio.run(server_round(url, chat_bodies(images, same), 32)))
        finally:
            proc.terminate()
            proc.wait(30)
    report(rows, args, len(experts))


if __name__ == "__main__":
    main()
