"""``ddfm theory``: the configuration, the run over every check, and the tables it prints.

    ddfm theory                                  # table of residuals and gaps
    ddfm theory --out runs/theory.json           # ... also written as JSON
    ddfm theory --vocab 3 --length 5 --prompt 1 --k 3 --seeds 0 1 2

:func:`theory` runs the finite checks (:mod:`ddfm.theory.identities`) on one random problem
per seed and, with ``--text``, the n-gram check (:mod:`ddfm.theory.text`); the router rows
carry the shared routing names (:mod:`ddfm.routing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ddfm.config import arg
from ddfm.io import write_json
from ddfm.theory.identities import ROUTERS, finite_checks, random_problem, router_error, two_sparse_counterexample
from ddfm.theory.text import TEXT_ROUTERS, text_equivalence


@dataclass
class TheoryConfig:
    """``ddfm theory``: the paper's identities checked exactly, residuals and gaps as a table."""

    vocab: int = arg("d, vocabulary size of the finite checks", 3)
    length: int = arg("N, sequence length of the finite checks", 4)
    prompt: int = arg("P, prompt tokens revealed at t = 0 in the finite checks", 1)
    k: int = arg("K, clusters of the finite checks", 3)
    support: float = arg("fraction of [d]^N in the support of each random target", 0.6)
    seeds: list[int] = arg("seeds of the random finite problems", default_factory=lambda: [0, 1, 2])
    text: bool = arg("also run the n-gram equivalence on the real Python docs", True)
    text_k: int = arg("K, expert n-gram models for the text check", 4)
    order: int = arg("n of the byte-level n-gram models", 3)
    add_k: float = arg("add-k smoothing of the centralised n-gram (pseudo-count per cell)", 0.01)
    temperature: float | None = arg("tau of the centroid router (eq. 29); default: calibrated on the "
                                    "partition as ddfm partition does", None)
    features: str = arg("document features for partition and centroid routing", "tfidf",
                        choices=("tfidf", "minilm"))
    max_train: int | None = arg("use at most this many training samples (quick runs)", None)
    max_test: int | None = arg("score at most this many test samples (seeded subset)", 400)
    seed: int = arg("seed of the text split and the partition", 0)
    out: str | None = arg("also write the results as JSON to this file", None)

    def __post_init__(self):
        if self.vocab < 1 or self.length < 1:
            raise ValueError(f"--vocab and --length must be >= 1, got {self.vocab} and {self.length}")
        if (self.vocab + 1) ** self.length > 4096:
            raise ValueError(f"--vocab {self.vocab} --length {self.length}: (d+1)^N = "
                             f"{(self.vocab + 1) ** self.length} states, at most 4096 are enumerated")
        if not 0 <= self.prompt < self.length:
            raise ValueError(f"--prompt must be in [0, --length), got {self.prompt}")
        if not 1 <= self.k <= self.vocab ** self.length:
            raise ValueError(f"--k must be in [1, d^N = {self.vocab ** self.length}], got {self.k}")
        if not 0 < self.support <= 1:
            raise ValueError(f"--support must be in (0, 1], got {self.support}")
        if not self.seeds:
            raise ValueError("--seeds needs at least one seed")
        if self.text_k < 1 or self.order < 1 or self.add_k <= 0:
            raise ValueError("--text-k and --order must be >= 1 and --add-k > 0 (smoothing keeps every "
                             "test token possible)")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")


FINITE_ROWS = [  # (key, equation, what it checks)
    ("coupling", "eq. 18", "p_0 is the law of the masked prompt X_0"),
    ("endpoints", "eq. 4", "p_n equals the target q"),
    ("conditional_degenerate", "eq. 19-20", "p_t(.|x0,x1) is the point mass at x_t"),
    ("conditional_continuity", "eq. 21-22", "conditional velocity satisfies continuity"),
    ("continuity", "eq. 9, 17", "marginal velocity satisfies continuity"),
    ("divergence_11_vs_12", "eq. 11-12", "flux divergence = pointwise divergence"),
    ("validity", "eq. 15-16", "velocity defines proper PMFs"),
    ("generation", "eq. 13-14", "sampled PMF of X_{t+1} = p_{t+1}"),
    ("decomposition", "eq. 24-27", "u = sum_k p_t(S_k|z) u_k"),
    ("decomposed_generation", "eq. 27, 13", "sampling the expert mixture gives p_{t+1}"),
    ("router_sum", "eq. 27", "experts' paths mix to the marginal: Σ_k π_k p_t(z|S_k) = p_t(z)"),
    ("running_posterior", "eq. 26-27", "token-by-token Bayes (--mode posterior's update) = p_t(S_k|z)"),
]


def theory(cfg: TheoryConfig) -> dict:
    """Run every check; returns {"finite": ..., "routers": ..., "two_sparse": ..., "text": ...}."""
    finite: dict[str, float] = {}
    routers: dict[str, dict[str, float]] = {}
    for seed in cfg.seeds:
        problem = random_problem(np.random.default_rng(seed), cfg.vocab, cfg.length, cfg.prompt,
                                 cfg.k, cfg.support)
        for key, value in finite_checks(problem).items():
            finite[key] = min(finite.get(key, 1.0), value) if key == "sparsity" else max(finite.get(key, 0.0), value)
        for name in ROUTERS:
            acc = routers.setdefault(name, {"tv": 0.0, "kl": 0.0, "velocity_error": 0.0})
            for key, value in router_error(problem, name).items():
                acc[key] = max(acc[key], value)
    result = {"setup": {"d": cfg.vocab, "N": cfg.length, "P": cfg.prompt, "K": cfg.k,
                        "support": cfg.support, "seeds": cfg.seeds},
              "finite": finite, "routers": routers, "two_sparse": two_sparse_counterexample()}
    if cfg.text:
        result["text"] = text_equivalence(cfg.text_k, cfg.order, cfg.add_k, cfg.temperature, cfg.features,
                                          cfg.seed, cfg.max_train, cfg.max_test)
    return result


def format_report(result: dict) -> str:
    """The results as plain-text tables."""
    s = result["setup"]
    lines = [f"Finite checks: d={s['d']} N={s['N']} P={s['P']} K={s['K']}, "
             f"{len(s['seeds'])} random targets (max over them; 0 up to rounding = holds)",
             f"  {'check':<24}{'equation':<12}{'residual':>10}  what"]
    for key, eq, what in FINITE_ROWS:
        lines.append(f"  {key:<24}{eq:<12}{result['finite'][key]:>10.1e}  {what}")
    ok = "yes" if result["finite"]["sparsity"] == 1.0 else "NO"
    lines.append(f"  {'1-sparsity':<24}{'§3.2':<12}{ok:>10}  only position P+t+1 moves at step t")
    lines += ["", "Routers in the sampling rule (final PMF vs q, worst target)",
              f"  {'router':<19}{'TV':>10}{'KL(q|.)':>10}{'max |du|':>10}  what"]
    for name, r in result["routers"].items():
        lines.append(f"  {name:<19}{r['tv']:>10.2e}{r['kl']:>10.3g}{r['velocity_error']:>10.2e}  {ROUTERS[name].help}")
    ts = result["two_sparse"]
    lines += ["", f"2-sparse velocity: continuity residual {ts['continuity']:.1e}, validity {ts['validity']:.1e}, "
              f"yet TV(sampled, path) = {ts['generation_tv']:.2f}: continuity implies generation only with 1-sparsity"]
    if "text" in result:
        lines += ["", format_text(result["text"])]
    return "\n".join(lines)


COLUMNS = {"max_abs_diff": "max|p-p_c|", "kl": "KL(p_c|p)", "seq_mixture_dll": "max|dLL_seq|"}


def format_text(text: dict) -> str:
    """The n-gram check (:func:`text_equivalence`) as a table, which router is exact for which
    experts with the measured residual, and what each column means."""
    t, r, ex = text["setup"], text["routers"], text["exact"]
    lines = [f"Real text: byte-level {t['order']}-gram, add-k {t['add_k']}, python-docs "
             f"({t['train_samples']} train / {t['test_samples']} test samples), K={t['k']} "
             f"({t['algorithm']}, {t['features']}, tau {t['temperature']:.3g}), {r['central']['tokens']} scored bytes",
             f"  {'model':<18}{'ppl':>9}{'gap':>9}{'max|p-p_c|':>12}{'KL(p_c|p)':>11}{'max|dLL_seq|':>14}  what"]
    for name, acc in r.items():
        what = "the centralised n-gram (all data)" if name == "central" else TEXT_ROUTERS[name].help
        lines.append(f"  {name:<18}{acc['ppl']:>9.4f}{acc['gap']:>+9.2%}{acc['max_abs_diff']:>12.1e}"
                     f"{acc['kl']:>11.2e}{acc['seq_mixture_dll']:>14.1e}  {what}")
    ctx, pre = r["context-posterior"], r["posterior"]
    lines += ["", "Which router is exact depends on the experts' state (eq. 24-27: the weight is p(S_k | state)):"]
    for name, e in ex.items():
        lines.append(f"  {e['experts']}: {name} reproduces {e['reproduces']}, "
                     f"{COLUMNS[e['residual_key']]} {e['residual']:.1e}")
    lines += [f"  posterior (the update of the ensemble's --mode posterior) with n-gram experts is not the "
              f"centralised n-gram: max|p-p_c| {pre['max_abs_diff']:.2g}, KL(p_c|p) {pre['kl']:.2e} nats/byte, "
              f"ppl gap {pre['gap']:+.2%}",
              f"  context-posterior is not the sequence mixture: max|dLL_seq| {ctx['seq_mixture_dll']:.3g} nats",
              "",
              "  ppl: exp(mean NLL) of the scored answer bytes; gap = ppl / ppl_central - 1",
              "  max|p-p_c|: largest |p(w|.) - p_central(w|.)| over every scored position and all 257 next bytes",
              "  KL(p_c|p): KL(p_central(.|h_t) || p(.|.)) averaged over the scored positions, nats per byte",
              "  max|dLL_seq|: largest |log p(answer|prompt) - log p_seq(answer|prompt)| over the test samples,",
              "    nats; p_seq(x) = sum_k pi_k prod_t p_k(x_t|h_t), the experts as whole-sequence models"]
    return "\n".join(lines)


def _finite_json(obj):
    """JSON has no infinity: write an infinite KL as the string "inf"."""
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else "-inf" if obj < 0 else "nan"
    return obj


def theory_cli(cfg: TheoryConfig) -> dict:
    """``ddfm theory``: print the tables; write JSON when ``--out`` is given."""
    result = theory(cfg)
    print(format_report(result))
    if cfg.out:
        write_json(cfg.out, _finite_json(result))
        print(f"\nwrote {cfg.out}")
    return result
