"""Throughput and latency of `ddfm serve` vs calling Ensemble.generate directly, in one run.

    .venv/bin/python benchmarks/bench_serve.py                      # tiny experts built here
    .venv/bin/python benchmarks/bench_serve.py --experts runs/expert-0 runs/expert-1 \\
        --router runs/partition/router.json --requests 64 --max-tokens 16

The reference is the Python API in a loop: one ``Ensemble.generate`` call per request,
one request at a time (what a user without the server would write). The server is
``ddfm serve`` started as a subprocess on a free 127.0.0.1 port and driven over HTTP by
an asyncio client at concurrency 1, 8 and 32; its dynamic batcher decodes concurrent
requests together, so its requests/s should pass the loop's as concurrency grows, while
at concurrency 1 the ratio shows the HTTP + JSON + batching-window overhead. Rows are
measured in interleaved rounds (direct, c=1, c=8, c=32, direct, ...) so that load from
other processes on a shared machine falls on all of them alike; each side uses one torch
thread. Everything is bounded (``--rounds`` x ``--requests`` per row) and stays on loopback.
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


def direct_round(ens, images, n: int, max_tokens: int, offset: int = 0) -> tuple[list[float], float]:
    """``n`` requests through ``Ensemble.generate``, one call per request: (latencies, wall seconds)."""
    from ddfm.ensemble import Request

    latencies = []
    t0 = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        ens.generate(Request(prompt="What is this?", image=images[(offset + i) % len(images)]),
                     max_new_tokens=max_tokens, do_sample=False)
        latencies.append(time.perf_counter() - t)
    return latencies, time.perf_counter() - t0


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


async def server_round(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], float]:
    """The bodies sent with at most ``concurrency`` in flight: (latencies, wall seconds)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def one(body):
            async with sem:
                t = time.perf_counter()
                resp = await client.post(url, json=body)
                resp.raise_for_status()
                latencies.append(time.perf_counter() - t)

        await one(bodies[0])  # open the connection
        latencies.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return latencies, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", nargs="*", default=None, help="expert directories (default: build tiny ones)")
    p.add_argument("--router", default=None, help="router.json (with --experts)")
    p.add_argument("--requests", type=int, default=32, help="requests per row and round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over all rows")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-batch-size", type=int, default=16)
    args = p.parse_args(argv)

    # One torch thread on both sides: the comparison is of the serving path, not of how
    # two processes share the cores (the server runs in a subprocess with OMP_NUM_THREADS=1).
    import torch

    from ddfm.ensemble import Ensemble, Request

    torch.set_num_threads(1)
    images = fmnist_images(32)
    rows: dict[str, tuple[list[float], float]] = {}

    def add(name: str, result: tuple[list[float], float]) -> None:
        lat, wall = rows.get(name, ([], 0.0))
        rows[name] = (lat + result[0], wall + result[1])

    with tempfile.TemporaryDirectory() as tmp:
        experts, router = (args.experts, args.router) if args.experts else build_tiny_ensemble(Path(tmp), images)
        ens = Ensemble.from_pretrained(experts, router, mode="centroid", top_k=1)
        ens.generate(Request(prompt="What is this?", image=images[0]), max_new_tokens=args.max_tokens)  # warm-up
        port = free_port()
        proc = start_server(experts, router, port, args.max_batch_size)
        try:
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            bodies = [{"model": "ddfm", "max_tokens": args.max_tokens, "temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": data_url(images[i % 32])}}]}]}
                      for i in range(args.requests)]
            # rounds interleave the rows, so drifting load on a shared machine hits them alike
            for r in range(args.rounds):
                print(f"round {r + 1}/{args.rounds}", flush=True)
                add("direct", direct_round(ens, images, args.requests, args.max_tokens))
                for c in args.concurrency:
                    add(c, asyncio.run(server_round(url, bodies, c)))
        finally:
            proc.terminate()
            proc.wait(30)

    direct = summary(*rows.pop("direct"))
    print(f"\n{args.rounds} x {args.requests} requests per row, max_tokens={args.max_tokens}, {len(experts)} experts "
          f"(top-1), 1 torch thread per side, {os.cpu_count()} CPU cores, loopback")
    print(f"{'':28s} {'req/s':>8s} {'p50 ms':>9s} {'p99 ms':>9s}   {'req/s ratio':>11s} {'p50 ratio':>9s}")
    print(f"{'Ensemble.generate loop':28s} {direct['rps']:8.2f} {direct['p50_ms']:9.1f} {direct['p99_ms']:9.1f}")
    for c, result in rows.items():
        s = summary(*result)
        print(f"{'ddfm serve, concurrency ' + str(c):28s} {s['rps']:8.2f} {s['p50_ms']:9.1f} {s['p99_ms']:9.1f}"
              f"   {s['rps'] / direct['rps']:10.2f}x {s['p50_ms'] / direct['p50_ms']:8.2f}x")


if __name__ == "__main__":
    main()
