"""Decode speed of the ensemble vs plain `transformers` generate, and the router's share, in one run.

    .venv/bin/python benchmarks/bench_generate.py                   # tiny and small experts built here
    .venv/bin/python benchmarks/bench_generate.py --experts runs/expert-0 runs/expert-1 \\
        --router runs/partition/router.json --new-tokens 64 --repeats 5

Three comparisons, each timed side by side, alternating, median of ``--repeats``:

1. **top-1** — ``Ensemble.generate`` (centroid router, top_k=1) vs ``model.generate`` of the
   expert it routes to; decode tokens/s = (N-1) / (t(N) - t(1)), so prefill and routing
   cancel. Target ratio >= 0.95.
2. **top-2** — the mixture of both experts (each with its own KV cache) vs the ideal, the
   time of generating with expert 0 plus with expert 1 separately. Target >= 0.9. Where
   the gap goes: top-2 vs the two experts' plain forwards taking turns per token (no
   mixing), as a per-token mixture must; vs the ensemble's own ``expert:J`` runs one after
   the other (the same decode loop, so the ratio is what mixing and taking turns cost and
   nothing else); and the plain forwards taking turns vs the same forwards one expert
   after the other: what the turns alone cost on this machine, where each expert's weights
   leave the CPU cache between its tokens, a cost the ideal's separate runs never pay.
3. **router share** of one request's time (route + generate ``--request-tokens``): a
   separate encoder (efficientnet-lite0, real weights) and the shared encoder (the
   experts' own vision tower, whose output the chosen expert reuses). The paper reports
   5.4 % for a separate CLIP ViT-B/16 and 0 % for a shared encoder.

Each comparison runs on two pairs of experts built here (``--preset``): ``tiny-llava``
(7 MB of fp32 weights each: one expert's weights stay in this CPU's cache between tokens,
two do not, so every per-token turn between experts is a cache refill the ideal never
pays) and ``small-llava`` (109 MB each, more than the L3: decoding streams the weights from
memory either way, as real experts do).

Greedy decoding; the ensemble's tokens are checked equal to transformers' before timing.
Timed runs decode exactly N tokens on both sides with eos switched off: the ensemble with
``eos_ids = set()``, transformers with ``eos_token_id=None`` (no eos criterion). Forcing
the length with ``min_new_tokens`` instead would add a logits processor and an eos check
to every transformers step (~0.1 ms of ~1.1 ms here) that the ensemble does not run,
making the references slower than they are.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from common import fmnist_images, write_image_records, write_results  # noqa: E402


def build_experts(root: Path, images, preset: str = "tiny-llava") -> list[str]:
    """Two experts of ``preset`` (``ddfm init``, seeds 0 and 1) sharing one tokenizer and one tower."""
    from ddfm.init import InitConfig, init
    from ddfm.model.checkpoint import load_model, save_checkpoint

    data = write_image_records(root, images)
    experts = [str(init(InitConfig(preset=preset, data=str(data), out=str(root / f"expert-{k}"),
                                   seed=k))) for k in range(2)]
    # the LLaVA recipe trains with a frozen vision tower: give expert 1 expert 0's tower
    m0, _ = load_model(experts[0])
    m1, p1 = load_model(experts[1])
    m1.model.vision_tower.load_state_dict(m0.model.vision_tower.state_dict())
    save_checkpoint(m1, p1, experts[1])
    return experts


def write_router(out: Path, encoder, images, k: int = 2) -> Path:
    """A K-cluster router over ``encoder``'s features (balanced k-means), in the partition format."""
    from ddfm.kmeans import BalancedKMeans
    from ddfm.partition import write_router as _write

    X = encoder.encode(images)
    km = BalancedKMeans(n_clusters=k, random_state=0).fit(X)
    out.mkdir(parents=True, exist_ok=True)
    _write(out, km.cluster_centers_.astype(np.float32), {
        "k": k, "temperature": 20.0, "top_k": 1, "encoder": encoder.spec, "modality": "image",
        "dim": int(X.shape[1]), "centroids": "router.safetensors", "cluster_shares": [1.0 / k] * k})
    return out / "router.json"


def plain_inputs(processor, prompt: str, image):
    """The prompt as plain transformers sees it: the ONE prompt format + the processor."""
    from ddfm.model.chat import render_prompt

    text = render_prompt(processor, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}])
    return processor(text=text, images=[image], return_tensors="pt")


def hf_generate(model, enc, n: int, exactly: bool = True) -> torch.Tensor:
    """Plain transformers greedy generate; ``exactly``: n tokens, eos switched off."""
    config = copy.copy(model.generation_config)
    if exactly:
        config.eos_token_id = None
    with torch.inference_mode():
        return model.generate(**enc, max_new_tokens=n, do_sample=False, generation_config=config)


def hf_two_interleaved(models, enc, n: int, turns: bool = True) -> None:
    """Both experts decode n greedy tokens with plain transformers forwards, taking turns per
    token as a per-token mixture must (each keeps its own KV cache; no mixing), or with
    ``turns=False`` the same forwards one expert after the other."""
    from ddfm.ensemble.experts import _cache_argument

    def greedy(model, out):
        return model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True,
                     **{_cache_argument(type(model)): out.past_key_values})

    with torch.inference_mode():
        if not turns:
            for m in models:
                out = m(**enc, use_cache=True)
                for _ in range(n - 1):
                    out = greedy(m, out)
            return
        outs = [m(**enc, use_cache=True) for m in models]
        for _ in range(n - 1):
            outs = [greedy(m, o) for m, o in zip(models, outs)]


def interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, the functions taking turns so load changes hit all."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def decode_tps(gens: dict, n: int, repeats: int) -> dict[str, float]:
    """Decode tokens/s of each ``gens[name](m)``: (n-1) / (t(n) - t(1)); t(1) = prefill (+ routing)."""
    fns = {}
    for name, gen in gens.items():
        fns[(name, n)] = (lambda g: lambda: g(n))(gen)
        fns[(name, 1)] = (lambda g: lambda: g(1))(gen)
    t = interleaved(fns, repeats)
    return {name: (n - 1) / max(t[(name, n)] - t[(name, 1)], 1e-9) for name in gens}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", nargs="*", default=None, help="two expert directories (default: build them)")
    p.add_argument("--router", default=None, help="router.json for --experts (default: efficientnet-lite0 router)")
    p.add_argument("--preset", nargs="+", default=["tiny-llava", "small-llava"],
                   help="model presets of the experts built here, one comparison each")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens decoded per timed generation")
    p.add_argument("--request-tokens", type=int, default=16, help="tokens of a request for the router share")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine may be shared)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ddfm.features.registry import get_encoder

    images = fmnist_images(24)
    tmp = Path(tempfile.mkdtemp(prefix="bench-generate-"))
    effnet = get_encoder("efficientnet-lite0")
    router = args.router or str(write_router(tmp / "router-effnet", effnet, images))
    pairs = {"given": args.experts} if args.experts else {
        preset: build_experts(tmp / preset, images, preset) for preset in args.preset}
    results = {}
    for name, experts in pairs.items():
        size = sum((Path(e) / "model.safetensors").stat().st_size for e in experts) / len(experts) / 1e6
        print(f"== {name} experts ({size:.0f} MB of weights each) ==")
        results[name] = measure(experts, router, images, tmp / name, args)
    if args.json:
        write_results(args.json, results)
    return results


def measure(experts: list[str], router: str, images, tmp: Path, args) -> dict:
    """The three comparisons for one pair of experts; prints them and returns the numbers."""
    from ddfm.ensemble import Ensemble, Request

    image, prompt = images[0], "What is this?"
    request = Request(prompt, image=image)
    n, R = args.new_tokens, args.repeats
    results: dict = {"experts": experts, "router": router, "new_tokens": n, "repeats": R, "threads": args.threads}

    # 1. top-1 ensemble vs transformers generate of the routed expert
    top1 = Ensemble.from_pretrained(experts, router)
    k = int(top1.route([request])[0].argmax())
    model, enc = top1.experts[k], plain_inputs(top1.processor, prompt, image)
    want = hf_generate(model, enc, n, exactly=False)[0, enc["input_ids"].shape[1]:].tolist()
    got = top1.generate(request, max_new_tokens=n, stop=[])[0].token_ids
    if got != want:
        sys.exit(f"bench_generate: the ensemble's tokens differ from transformers' ({got[:8]} vs {want[:8]})")
    nomin = Ensemble.from_pretrained(experts, router)
    nomin.eos_ids = set()  # decode exactly n tokens, as hf_generate does with eos switched off
    mix = Ensemble.from_pretrained(experts, router, mode="uniform", top_k=2)
    mix.eos_ids = set()
    other = mix.experts[1 - k]
    solo = [Ensemble.from_pretrained(experts, mode=f"expert:{j}") for j in (k, 1 - k)]
    for ens in solo:
        ens.eos_ids = set()
    tps = decode_tps({"top1": lambda m: nomin.generate(request, max_new_tokens=m),
                      "hf": lambda m: hf_generate(model, enc, m),
                      "top2": lambda m: mix.generate(request, max_new_tokens=m),
                      "hf_other": lambda m: hf_generate(other, enc, m),
                      "hf_turns": lambda m: hf_two_interleaved([model, other], enc, m),
                      "hf_one_then_other": lambda m: hf_two_interleaved([model, other], enc, m, turns=False),
                      "solo": lambda m: solo[0].generate(request, max_new_tokens=m),
                      "solo_other": lambda m: solo[1].generate(request, max_new_tokens=m)}, n, R)
    results.update({f"{name}_tps": v for name, v in tps.items()})
    results["top1_ratio"] = tps["top1"] / tps["hf"]
    # 2. top-2 mixture vs the two experts run one after the other (the ideal)
    ideal = 1.0 / (1.0 / tps["hf"] + 1.0 / tps["hf_other"])  # tokens/s of running both
    results["top2_ideal_tps"] = ideal
    results["top2_ratio"] = tps["top2"] / ideal
    # the same two forwards taking turns per token without any mixing: the part of the
    # gap that is the turns themselves (each expert's weights leaving the CPU cache)
    results["top2_vs_turns"] = tps["top2"] / tps["hf_turns"]
    # the same plain forwards with and without turns: what the turns alone cost on this machine
    results["turns_vs_one_then_other"] = tps["hf_turns"] / tps["hf_one_then_other"]
    # the ensemble's own decode loop on one expert at a time, one after the other
    results["top2_solo_tps"] = 1.0 / (1.0 / tps["solo"] + 1.0 / tps["solo_other"])
    results["top2_vs_solo"] = tps["top2"] / results["top2_solo_tps"]

    # 3. the router's share of one request (route + generate --request-tokens)
    m = args.request_tokens
    forced = Ensemble.from_pretrained(experts, mode=f"expert:{k}")
    forced.eos_ids = set()
    shared = Ensemble.from_pretrained(experts, _tower_router(tmp, experts[0], images), shared_encoder=True)
    shared.eos_ids = set()
    t = interleaved({"forced": lambda: forced.generate(request, max_new_tokens=m),
                     "route": lambda: nomin.route([request]),
                     "effnet": lambda: nomin.generate(request, max_new_tokens=m),
                     "shared": lambda: shared.generate(request, max_new_tokens=m)}, R)
    t_request = t["effnet"]
    results["request_s"] = {name: v for name, v in t.items()}
    results["router_share_effnet"] = t["route"] / t_request
    results["router_overhead_effnet"] = (t_request - t["forced"]) / t_request
    results["router_overhead_shared_tower"] = (t["shared"] - t["forced"]) / t["shared"]

    print(f"top-1 ensemble decode {results['top1_tps']:.1f} tok/s vs transformers {results['hf_tps']:.1f} tok/s: "
          f"ratio {results['top1_ratio']:.3f} (target >= 0.95)")
    print(f"top-2 mixture decode {results['top2_tps']:.1f} tok/s vs ideal (both experts) {ideal:.1f} tok/s: "
          f"ratio {results['top2_ratio']:.3f} (target >= 0.9); vs the two experts' plain forwards taking turns per "
          f"token {tps['hf_turns']:.1f} tok/s: ratio {results['top2_vs_turns']:.3f}; vs the ensemble's expert:J "
          f"runs one after the other {results['top2_solo_tps']:.1f} tok/s: ratio {results['top2_vs_solo']:.3f}")
    print(f"taking turns per token: the two experts' plain forwards {tps['hf_turns']:.1f} tok/s vs the same forwards "
          f"one expert after the other {tps['hf_one_then_other']:.1f} tok/s: ratio "
          f"{results['turns_vs_one_then_other']:.3f} (1.0 = the turns cost nothing)")
    print(f"router share of a {m}-token request ({t_request * 1000:.1f} ms): efficientnet-lite0 "
          f"{100 * results['router_share_effnet']:.1f} % (route alone; request vs forced expert: "
          f"{100 * results['router_overhead_effnet']:.1f} %), shared tower "
          f"{100 * results['router_overhead_shared_tower']:.1f} % (paper: 5.4 % CLIP ViT-B/16, 0 % shared)")
    return results


def _tower_router(tmp: Path, expert: str, images) -> str:
    from ddfm.features.registry import get_encoder

    return str(write_router(tmp / "router-tower", get_encoder(f"tower:{expert}"), images))


if __name__ == "__main__":
    main()
