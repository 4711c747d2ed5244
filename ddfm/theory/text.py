"""The paper's identity on real text: byte-level n-gram experts on the Python documentation.

Byte-level n-gram experts trained on the balanced partition of the Python documentation
reproduce the centralised n-gram model exactly when the smoothing pseudo-counts are split by
cluster share and the router is the posterior given the model's state, its context h_t (the
last n−1 bytes): the diagnostic router ``context-posterior``. The posterior given the whole
prefix (``posterior``, ``--mode posterior``'s update) is exact for a different model — the
experts taken as whole-sequence models, Σ_k π_k Π_t p_k(x_t | h_t) — and its departure from
the centralised n-gram is measured (max |Δp|, KL, perplexity), like that of the paper's
time-independent routers (``soft``, ``top-1``: eq. 29 on the prompt's features). The routers
of :data:`TEXT_ROUTERS` carry the names of the shared routing vocabulary (:mod:`ddfm.routing`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer

from ddfm import mixture
from ddfm.features.registry import get_encoder
from ddfm.kmeans import BalancedKMeans
from ddfm.partition import calibrate_temperature
from ddfm.prepare import build_source
from ddfm.router import Router
from ddfm.routing import ALL, ROUTINGS, check_router_names

log = logging.getLogger(__name__)


BOUNDARY = 256          # byte-level vocabulary: 256 byte values + one document boundary symbol
VOCAB = 257


def encode(text: str, order: int) -> np.ndarray:
    """UTF-8 bytes with n−1 boundary symbols before and one after: (len + n,) int64."""
    body = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
    return np.concatenate([np.full(order - 1, BOUNDARY), body, [BOUNDARY]])


def window_codes(tokens: np.ndarray, order: int) -> np.ndarray:
    """Every n-token window (h, w) of one encoded document as one int64, h·V + w: (T,)."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, order)          # (T, n)
    return windows @ (VOCAB ** np.arange(order - 1, -1, -1, dtype=np.int64))


class NGramCounts:
    """The window counts c(h, w) of one corpus (the whole training set or one cluster).

    ``codes``/``counts``: sorted unique window codes h·V + w and their counts;
    ``total`` = N, the number of windows (= tokens predicted).
    """

    def __init__(self, documents: list[np.ndarray], order: int):
        codes = np.concatenate([window_codes(d, order) for d in documents]) if documents \
            else np.zeros(0, np.int64)
        self.order = order
        self.codes, self.counts = np.unique(codes, return_counts=True)
        self.total = int(self.counts.sum())

    def table(self, contexts: np.ndarray) -> np.ndarray:
        """c(h, ·) for each context code h: (H,) int64 -> (H, V) float64."""
        lo = np.searchsorted(self.codes, contexts * VOCAB)
        hi = np.searchsorted(self.codes, (contexts + 1) * VOCAB)
        lens = hi - lo
        rows = np.repeat(np.arange(len(contexts)), lens)
        idx = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens - lo, lens)  # lo..hi-1 per row
        out = np.zeros((len(contexts), VOCAB))
        out[rows, self.codes[idx] % VOCAB] = self.counts[idx]      # (row, token) pairs are unique
        return out


@dataclass
class SmoothedNGram:
    """Add-k smoothing written as a pseudo-count mass ``a`` per context, spread evenly
    over the V next tokens (k = a/V per cell):

        p(w | h) = (c(h, w) + a/V) / (c(h) + a)
        P(h)     = (c(h) + a) / (N + a·V^{n−1})        # the model's probability of context h

    i.e. the smoothed window distribution (c(h, w) + a/V) / (N + a·V^{n−1}).
    """

    counts: NGramCounts
    pseudo_count: float

    def next_token_probs(self, contexts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(H,) context codes -> (p(· | h) (H, V), log P(h) (H,))."""
        c = self.counts.table(contexts)
        c_h = c.sum(1)
        probs = (c + self.pseudo_count / VOCAB) / (c_h + self.pseudo_count)[:, None]
        n_contexts = float(VOCAB) ** (self.counts.order - 1)
        log_ctx = np.log(c_h + self.pseudo_count) - np.log(self.counts.total + self.pseudo_count * n_contexts)
        return probs, log_ctx


def ngram_experts(documents: list[np.ndarray], labels: np.ndarray, k: int, order: int, add_k: float,
                  split: str = "share") -> tuple[SmoothedNGram, list[SmoothedNGram], np.ndarray]:
    """The centralised model (all documents, add-k ``add_k``) and one expert per cluster.

    ``split="share"`` gives expert k the pseudo-counts a_k = π_k · a with π_k = N_k / N, its
    share of the training windows: then Σ_k π_k q_k = q exactly (docs/theory.md).
    ``split="full"`` gives every expert the full add-k (the naive choice: K times too much
    smoothing in the mixture). Returns (central, experts, π (K,)).
    """
    a = add_k * VOCAB
    central = SmoothedNGram(NGramCounts(documents, order), a)
    shards = [NGramCounts([d for d, lab in zip(documents, labels) if lab == j], order) for j in range(k)]
    shares = np.array([s.total for s in shards], dtype=np.float64) / central.counts.total
    masses = {"share": shares * a, "full": np.full(k, a)}[split]
    return central, [SmoothedNGram(s, m) for s, m in zip(shards, masses)], shares


def python_docs_samples(seed: int = 0) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) samples of the Python documentation as (prompt, answer) texts: the records
    of ``build_source("python-docs")`` (:mod:`ddfm.prepare`; prompt = the human turn, answer =
    the passage), so theory and the pipeline see the same split."""
    train, test = build_source("python-docs", seed=seed)
    return [_record_sample(r) for r in train], [_record_sample(r) for r in test]


def _record_sample(record) -> tuple[str, str]:
    """A canonical record as (prompt, answer): every turn before the last joined, the last turn."""
    turns = [t["value"].replace("<image>", "").strip() for t in record.conversations]
    return "\n".join(turns[:-1]), turns[-1]


def _sample_tokens(sample: tuple[str, str], order: int) -> tuple[np.ndarray, int]:
    """Encoded "prompt\nanswer" and the number of prompt windows (not scored)."""
    prompt, answer = sample
    return encode(prompt + "\n" + answer, order), len((prompt + "\n").encode("utf-8"))


def text_features(fit_texts: list[str], texts: list[list[str]], kind: str = "tfidf") -> list[np.ndarray]:
    """Unit-norm feature rows for each list in ``texts``: tf-idf + LSA fitted on ``fit_texts``, or the
    ``minilm`` sentence encoder (:func:`ddfm.features.registry.get_encoder`). Returns one (M_i, D) float32
    array per list."""
    if kind == "minilm":
        encoder = get_encoder("minilm")
        return [encoder.encode(t) for t in texts]
    if kind != "tfidf":
        raise ValueError(f"features: unknown kind {kind!r}, expected 'tfidf' or 'minilm'")
    # tf-idf then a 128-d LSA projection: dense rows small enough for k-means on ~20k samples
    vec = TfidfVectorizer(sublinear_tf=True, max_features=8192, token_pattern=r"(?u)\b[A-Za-z_]\w+\b")
    x_fit = vec.fit_transform(fit_texts)
    svd = TruncatedSVD(n_components=max(1, min(128, x_fit.shape[1] - 1, len(fit_texts) - 1)), random_state=0)
    svd.fit(x_fit)
    out = []
    for t in texts:
        x = svd.transform(vec.transform(t)).astype(np.float32)
        out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
    return out


def partition_documents(features: np.ndarray, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, str]:
    """Balanced clusters of the training documents: (labels (M,), centroids (K, D) unit rows,
    algorithm): spherical balanced k-means (:class:`ddfm.kmeans.BalancedKMeans`), the
    centroids the clusters' mean features."""
    km = BalancedKMeans(n_clusters=k, random_state=seed).fit(features)
    labels, algorithm = np.asarray(km.labels_), "balanced-kmeans"
    centroids = np.stack([features[labels == j].mean(0) for j in range(k)])
    return labels, centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12), algorithm


@dataclass
class DocumentEval:
    """One test sample, encoded, with what the time-independent routers see.

    tokens: (T + n,) int64 encoded "prompt\nanswer"; prompt_len: windows of the prompt (not scored);
    centroid_weights: (K,) softmax(τ · cos(f(prompt), c_k)) (eq. 29).
    """

    tokens: np.ndarray
    prompt_len: int
    centroid_weights: np.ndarray


def _context_posterior(doc: DocumentEval, prior, log_ctx: np.ndarray, token_logp: np.ndarray):
    """p(S_k | h_t) = π_k P_k(h_t) / Σ_j π_j P_j(h_t): exact for n-grams."""
    return mixture.posterior_update(prior, torch.as_tensor(log_ctx))


def _prefix_posterior(doc: DocumentEval, prior, log_ctx: np.ndarray, token_logp: np.ndarray):
    """p(S_k | x_<t) ∝ π_k Π_{s<t} p_k(x_s | h_s), every earlier token of the sample as evidence
    (``--mode posterior``'s update, eq. 26–27): exact for whole-sequence experts."""
    seen = np.vstack([np.zeros((1, token_logp.shape[1])), np.cumsum(token_logp, 0)[:-1]])
    return mixture.posterior_update(prior, torch.as_tensor(seen))


def _centroid(setting: str) -> Callable:
    """The eq. 29 weights of the prompt's features, fixed for the whole sample (time-independent),
    with the ``top_k`` of the routing setting (``soft``: all, ``top-1``: renormalised top-1)."""
    top_k = ROUTINGS[setting].top_k

    def log_weights(doc: DocumentEval, prior, log_ctx: np.ndarray, token_logp: np.ndarray):
        w = torch.as_tensor(doc.centroid_weights, dtype=torch.float64)[None]
        if top_k != ALL:
            w = mixture.top_k_renormalise(w, top_k)
        return torch.log(w).expand(*prior.shape)

    return log_weights


def _prior(doc: DocumentEval, prior, log_ctx: np.ndarray, token_logp: np.ndarray):
    """The cluster shares π_k at every position."""
    return prior


class TextRouter(NamedTuple):
    """A router of the n-gram check: its log weights, what it is, and which experts it mixes.

    ``log_weights(doc, prior, log_ctx, token_logp)`` -> (T, K) torch float64, with ``prior``
    (T, K) log π_k and the arrays of :func:`router_log_weights`; ``experts``: ``"share"``
    (share-split smoothing, exact) or ``"full"`` (every expert with the full add-k).
    """

    log_weights: Callable
    help: str
    experts: str = "share"


# Keyed by the shared routing names (ddfm.routing): the settings posterior, soft, top-1 as
# they are realised on n-gram experts, and the diagnostic routers.
TEXT_ROUTERS: dict[str, TextRouter] = {
    "context-posterior": TextRouter(_context_posterior,
                                    "p(S_k | h_t) = pi_k P_k(h_t) / sum_j pi_j P_j(h_t), h_t = last n-1 bytes"),
    "naive-smoothing": TextRouter(_context_posterior,
                                  "the same router, but every expert smoothed with the full add-k", experts="full"),
    "posterior": TextRouter(_prefix_posterior,
                            "p(S_k | x_<t) from pi_k: Bayes over the whole sample so far (--mode posterior's update)"),
    "soft": TextRouter(_centroid("soft"), "softmax(tau cos(f(prompt), c_k)), time-independent (eq. 29)"),
    "top-1": TextRouter(_centroid("top-1"), "the same, top-1 and renormalised (the paper's setting)"),
    "prior": TextRouter(_prior, "cluster shares pi_k"),
}
check_router_names(TEXT_ROUTERS)


def router_log_weights(name: str, doc: DocumentEval, shares: np.ndarray, log_ctx: np.ndarray,
                       token_logp: np.ndarray) -> torch.Tensor:
    """log router weights (T, K) at every scored position of one document, as a torch tensor.

    log_ctx: (T, K) log P_k(h_t), each expert's probability of the current context;
    token_logp: (T, K) log p_k(x_t | h_t) of the token actually at each position.
    """
    if name not in TEXT_ROUTERS:
        raise ValueError(f"router: unknown name {name!r}, expected one of {list(TEXT_ROUTERS)}")
    prior = torch.log(torch.as_tensor(shares, dtype=torch.float64)).expand(*token_logp.shape)
    return TEXT_ROUTERS[name].log_weights(doc, prior, log_ctx, token_logp)


# Which router is exact for which kind of expert (docs/theory.md §3, "Which posterior"):
# router -> (the experts' state, the model it reproduces exactly, the key of that comparison).
TEXT_EXACT = {
    "context-posterior": ("n-gram experts (state = the last n-1 bytes)", "the centralised n-gram",
                          "max_abs_diff"),
    "posterior": ("whole-sequence experts (state = the whole prefix)",
                         "the sequence mixture sum_k pi_k p_k(x)", "seq_mixture_dll"),
}


def score_document(doc: DocumentEval, central: SmoothedNGram, experts: dict[str, list[SmoothedNGram]],
                   shares: np.ndarray, order: int) -> dict[str, dict[str, float]]:
    """Per router, on the scored (answer) positions of one sample:

    ``nll``: summed −log p(x_t | ·) (nats); ``tokens``: their count; ``max_abs_diff``: the
    largest |p_router(w | ·) − p_central(w | ·)| over positions and all V next tokens;
    ``kl_sum``: Σ_t KL(p_central(· | h_t) ‖ p_router(· | ·)) (nats); ``seq_mixture_dll``:
    |log p_router(answer | prompt) − log p_seq(answer | prompt)| (nats), where
    p_seq(x) = Σ_k π_k Π_t p_k(x_t | h_t) is the mixture of the share-smoothed experts taken as
    whole-sequence models (one cluster drawn per sample).
    """
    codes = window_codes(doc.tokens, order)             # every window; the prompt's are not scored
    contexts, targets = codes // VOCAB, codes % VOCAB
    rows, scored = np.arange(len(codes)), slice(doc.prompt_len, None)
    p_central, _ = central.next_token_probs(contexts[scored])                     # (T, V)
    log_central = np.log(p_central)
    n_scored = len(p_central)
    tables = {}
    for split, models in experts.items():
        probs, log_ctx = zip(*(m.next_token_probs(contexts) for m in models))
        tables[split] = np.log(np.stack(probs, 1)), np.stack(log_ctx, 1)          # (T_all, K, V), (T_all, K)
    seq_ll = _sequence_mixture_ll(np.log(shares), tables["share"][0][rows, :, targets], doc.prompt_len)

    def scores(logp: np.ndarray, p: np.ndarray) -> dict[str, float]:             # (T, V) log p, p
        nll = float(-logp[rows[:n_scored], targets[scored]].sum())
        return {"nll": nll, "tokens": n_scored, "max_abs_diff": float(np.abs(p - p_central).max()),
                "kl_sum": float(np.sum(p_central * (log_central - logp))), "seq_mixture_dll": abs(-nll - seq_ll)}

    out = {"central": scores(log_central, p_central)}
    for name, router in TEXT_ROUTERS.items():
        expert_logp, log_ctx = tables[router.experts]
        token_logp = expert_logp[rows, :, targets]                                # (T_all, K)
        log_w = router_log_weights(name, doc, shares, log_ctx, token_logp)[scored]
        logp = mixture.mixture_log_probs(log_w, torch.as_tensor(expert_logp[scored])).numpy()  # (T, V)
        out[name] = scores(logp, np.exp(logp))
    return out


def _sequence_mixture_ll(log_prior: np.ndarray, token_logp: np.ndarray, prompt_len: int) -> float:
    """log p_seq(answer | prompt) for p_seq(x) = Σ_k π_k Π_t p_k(x_t | h_t): the log of
    Σ_k π_k p_k(prompt, answer) minus the log of Σ_k π_k p_k(prompt). token_logp: (T_all, K)."""
    return float(logsumexp(log_prior + token_logp.sum(0)) - logsumexp(log_prior + token_logp[:prompt_len].sum(0)))


def _add_perplexities(totals: dict[str, dict[str, float]]) -> None:
    """ppl = exp(NLL / tokens), gap = ppl / ppl_central − 1 and kl = kl_sum / tokens (the mean
    KL(p_central ‖ p) per scored byte, nats) for every model, in place."""
    ppl_central = math.exp(totals["central"]["nll"] / totals["central"]["tokens"])
    for acc in totals.values():
        acc["ppl"] = math.exp(acc["nll"] / acc["tokens"])
        acc["gap"] = acc["ppl"] / ppl_central - 1
        acc["kl"] = acc["kl_sum"] / acc["tokens"]


def text_equivalence(k: int = 4, order: int = 3, add_k: float = 0.01, temperature: float | None = None,
                     features: str = "tfidf", seed: int = 0, max_train: int | None = None,
                     max_test: int | None = 400) -> dict:
    """Train a centralised byte-level n-gram model and K cluster experts on the Python docs
    and score the answers of the test samples with every router of :data:`TEXT_ROUTERS`.

    Partition: features of each training sample's whole text; routing (eq. 29): features of
    the test prompt only, τ = ``temperature`` or, when None, calibrated on the partition like
    ``ddfm partition`` does (:func:`ddfm.partition.calibrate_temperature`). ``max_train`` / ``max_test`` cap the samples (seeded subsets).
    Returns {"setup": ..., "routers": {name: {"ppl", "gap", "max_abs_diff", "kl", "seq_mixture_dll",
    "nll", "kl_sum", "tokens"}}, "exact": ...}: ``gap`` = ppl / ppl_central − 1; ``max_abs_diff`` =
    max |p_router − p_central| over all scored positions and all V next tokens; ``kl`` = mean
    KL(p_central ‖ p_router) per scored byte (nats); ``seq_mixture_dll`` = max over samples of
    |log p_router(answer | prompt) − log p_seq(answer | prompt)| (nats, :func:`score_document`).
    ``exact`` names, per router of :data:`TEXT_EXACT`, the experts it is exact for, the model it
    reproduces and the measured residual of that claim.
    """
    train, test = python_docs_samples(seed)
    rng = np.random.default_rng(seed)
    train, test = _subset(train, max_train, rng), _subset(test, max_test, rng)
    if len(train) < k or not test:
        raise ValueError(f"python-docs: {len(train)} training and {len(test)} test samples are too few for K={k}")
    train_texts = [p + "\n" + a for p, a in train]
    f_train, f_prompt = text_features(train_texts, [train_texts, [p for p, _ in test]], features)
    labels, centroids, algorithm = partition_documents(f_train, k, seed)
    log.info("theory: %d training samples in %d clusters (%s, %s features), %d test samples",
             len(train), k, algorithm, features, len(test))
    central, experts, shares = ngram_experts([encode(t, order) for t in train_texts], labels, k, order, add_k)
    naive = [SmoothedNGram(e.counts, central.pseudo_count) for e in experts]
    if temperature is None:
        temperature = calibrate_temperature(f_train, centroids, labels, seed=seed)["temperature"]
    # the neural ensemble's router: eq. 29 on the prompts' features
    router = Router(centroids, temperature, top_k=k, modality="text", cluster_shares=shares)
    weights = router.probabilities(f_prompt).double().numpy()                  # (Q, K), eq. 29
    totals: dict[str, dict[str, float]] = {}
    with _one_torch_thread():
        _score_all(test, weights, central, {"share": experts, "full": naive}, shares, order, totals)
    _add_perplexities(totals)
    setup = {"source": "python-docs", "order": order, "add_k": add_k, "k": k, "algorithm": algorithm,
             "features": features, "temperature": temperature, "train_samples": len(train),
             "test_samples": len(test), "samples_per_cluster": np.bincount(labels, minlength=k).tolist(),
             "cluster_shares": shares.tolist(), "top1_choices": np.bincount(weights.argmax(1), minlength=k).tolist()}
    exact = {name: {"experts": experts_kind, "reproduces": model, "residual_key": key,
                    "residual": totals[name][key]}
             for name, (experts_kind, model, key) in TEXT_EXACT.items()}
    return {"setup": setup, "routers": totals, "exact": exact}


def _score_all(test, weights, central, experts, shares, order, totals) -> None:
    """Score every test sample (:func:`score_document`): NLL, tokens and KL add up, the
    max differences are maxima over samples."""
    for i, (sample, w) in enumerate(zip(test, weights)):
        doc = DocumentEval(*_sample_tokens(sample, order), w)
        for name, r in score_document(doc, central, experts, shares, order).items():
            acc = totals.setdefault(name, {"nll": 0.0, "tokens": 0, "kl_sum": 0.0, "max_abs_diff": 0.0,
                                           "seq_mixture_dll": 0.0})
            for key in ("nll", "tokens", "kl_sum"):
                acc[key] += r[key]
            for key in ("max_abs_diff", "seq_mixture_dll"):
                acc[key] = max(acc[key], r[key])
        if (i + 1) % 100 == 0 or i + 1 == len(test):
            log.info("theory: scored %d/%d test samples", i + 1, len(test))


@contextlib.contextmanager
def _one_torch_thread():
    """Per-sample tensors are small (≈1k x K x 257): intra-op threads cost far more than they
    give, and on a shared machine they made torch.logsumexp ~50x slower in one measurement."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _subset(items: list, n: int | None, rng: np.random.Generator) -> list:
    if n is None or n >= len(items):
        return items
    return [items[i] for i in np.sort(rng.choice(len(items), size=n, replace=False))]
