"""The score matrix of the balanced k-means and the member sums of its centroid step.

Scores are (K, N) float32, one row per cluster: cosine similarity for unit rows, else
2 x·c − |c|², computed in chunks of X by oneDNN's product for K ≥ 8 where torch has it,
else the BLAS (:class:`_BlockScores`), so memory is O(N·D + N·K) and no (N, K, D) tensor
exists. Member sums are accumulated in float64 by the kernels of ``kernels.py``, updated
by only the points that changed cluster. See docs/partitioning.md.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import torch
from sklearn.utils import assert_all_finite

from ddfm.kmeans.kernels import _in_parts, _moves_kernel, _sums_kernel


def _tensor(X: np.ndarray, dtype: Any = np.float32) -> torch.Tensor:
    """A C-contiguous (N, D) torch tensor of ``dtype`` on X's memory when X already is one
    (no copy; a read-only array, e.g. a memmap, is only ever read)."""
    X = np.ascontiguousarray(X, dtype=dtype)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(X)


def _unit_rows(X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of X (N, D) scaled to unit L2 norm (zero rows stay zero), and the squared norms
    (N,) of the rows returned. X itself when every row already has norm 1 ± 1e-6 (features
    saved normalised): dividing would move each value by at most ~8 float32 ulps, and
    skipping it saves an (N, D) copy."""
    norms = X.norm(dim=1)
    if not bool(torch.isfinite(norms).all()):  # the norms show any NaN or infinity in X
        assert_all_finite(X.numpy(), input_name="X")  # scikit-learn's error naming it
        norms = X.double().norm(dim=1)  # finite values whose squares overflow float32
        return (X.double() / norms.clamp_min(1e-12)[:, None]).to(X.dtype), (norms > 1e-12).to(X.dtype)
    if len(norms) and float((norms - 1).abs().max()) <= 1e-6:
        return X, norms * norms
    return X / norms.clamp_min(1e-12)[:, None], (norms > 1e-12).to(X.dtype)


def _normalise(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


@functools.cache
def _onednn_linear() -> Any:
    """oneDNN's float32 ``x @ w.T`` (the op torch.compile emits for linear layers on the CPU),
    or None where this torch build lacks it."""
    try:
        op = torch.ops.mkldnn._linear_pointwise
        x, w = torch.ones(3, 4), torch.ones(2, 4)
        ok = torch.backends.mkldnn.is_available() and torch.equal(op(x, w, None, "none", [], ""), x @ w.T)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None
    return (lambda x, w: op(x, w, None, "none", [], "")) if ok else None


class _BlockScores:
    """Scores of blocks of points, C @ block.T written into columns of a (K, n) buffer.

    For K ≥ 8 clusters the product runs in oneDNN's kernel where torch has it: 200,000 x
    512 at K = 16 in 27 ms on two threads and 49 ms on one, against 43 and 91 ms for torch's
    BLAS products below. Narrower products are bound by reading X, which the BLAS does
    faster on two threads (K = 2: 12 vs 23 ms).
    Otherwise, on several threads the tall-skinny product block @ C.T (b, K) splits over
    them where the wide C @ block.T does not; it is computed in blocks of 4,096 rows (that
    fit in cache) and transposed into the K-major buffer (200,000 x 512, K = 16, 2 threads:
    41 ms vs 50 ms in blocks of 65,536 and 64 ms wide). On one thread the wide product is
    as fast (86 ms) and needs no copy."""

    TALL_ROWS = 4096
    ONEDNN_MIN_K = 8

    def __init__(self, C: torch.Tensor, rows: int):
        self.C = C.contiguous()
        self.onednn = _onednn_linear() if C.shape[0] >= self.ONEDNN_MIN_K and C.dtype == torch.float32 else None
        self.tall = torch.get_num_threads() > 1 and self.onednn is None
        self.tmp = torch.empty((min(rows, self.TALL_ROWS), C.shape[0]), dtype=torch.float32) if self.tall else None

    def __call__(self, block: torch.Tensor, out: torch.Tensor) -> None:
        """out (K, b) = C @ block.T for block (b, D)."""
        if self.onednn is not None:
            for a in range(0, len(block), self.TALL_ROWS):
                part = block[a:a + self.TALL_ROWS]
                out[:, a:a + len(part)].copy_(self.onednn(part, self.C).T)
            return
        if not self.tall:
            torch.mm(self.C, block.T, out=out)
            return
        for a in range(0, len(block), self.TALL_ROWS):
            part = block[a:a + self.TALL_ROWS]
            t = self.tmp[:len(part)]
            torch.mm(part, self.C.T, out=t)
            out[:, a:a + len(part)].copy_(t.T)


def _scores(C: torch.Tensor, X: torch.Tensor, spherical: bool, chunk_size: int, out: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Similarity of every centroid to every point, ``(K, N)`` float32 (one row per cluster),
    written into ``out`` when given (a buffer reused across iterations saves the page faults
    of fresh memory), ``chunk_size`` rows of X at a time.

    Spherical: cos(x_i, c_k) = c_k·x_i (unit rows). Euclidean: 2 c_k·x_i − |c_k|², which
    is −|x_i − c_k|² + |x_i|², so argmax and the assignment LP are unchanged.
    """
    K, N = C.shape[0], X.shape[0]
    out = torch.empty((K, N), dtype=torch.float32) if out is None else out
    score = _BlockScores(C, min(chunk_size, N))
    for a in range(0, N, chunk_size):
        block = X[a:a + chunk_size]
        score(block, out[:, a:a + len(block)])  # (K, chunk)
    if not spherical:
        out.mul_(2).sub_((C * C).sum(1)[:, None])
    return out


def _scores_of(C: torch.Tensor, X: torch.Tensor, rows: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Spherical scores C @ X[rows].T, (K, n) float32, gathering the rows in blocks of
    ``chunk`` into one reused buffer: a fresh (n, D) copy of the rows would cost its page
    faults, more than the product itself."""
    out = torch.empty((C.shape[0], len(rows)), dtype=torch.float32)
    buf = torch.empty((min(chunk, len(rows)), X.shape[1]), dtype=X.dtype)
    score = _BlockScores(C, len(buf))
    for a in range(0, len(rows), chunk):
        block = buf[:len(rows[a:a + chunk])]
        torch.index_select(X, 0, rows[a:a + chunk], out=block)
        score(block, out[:, a:a + len(block)])
    return out


def _cluster_sums(X: torch.Tensor, labels: torch.Tensor, K: int, weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Σ_{i: label k} w_i x_i for every cluster, (K, D) float64, accumulated in float64 by
    :func:`_sums_kernel`, one contiguous range of points per torch thread, summed in order
    (deterministic; one pass over X, 2x torch's sparse product)."""
    Xn, labels = X.numpy(), labels.numpy()
    w = np.ones(len(Xn), Xn.dtype) if weights is None else weights.numpy()

    def part(a: int, b: int) -> np.ndarray:
        out = np.zeros((K, Xn.shape[1]))
        _sums_kernel(Xn, labels, w, a, b, out)
        return out

    return torch.from_numpy(sum(_in_parts(part, len(Xn), min_part=8192)))


def _update_sums(X: torch.Tensor, labels: torch.Tensor, prev: torch.Tensor | None, sums: torch.Tensor | None,
                 K: int) -> torch.Tensor:
    """Member sums Σ_{i: label k} x_i (K, D) float64 for ``labels``, updated from the sums
    for ``prev`` by only the points that changed cluster (after the first iterations a few
    percent), or recomputed when many did. All in float64, so that the running sums do not
    drift."""
    if prev is None or sums is None:
        return _cluster_sums(X, labels, K)
    Xn, new, old = X.numpy(), labels.numpy(), prev.numpy()
    changed = np.flatnonzero(new != old)  # (m,) sorted: the kernel reads these rows of X in place
    if len(changed) > X.shape[0] // 5:  # beyond N/5 scattered rows, one pass over X costs less
        return _cluster_sums(X, labels, K)

    def part(a: int, b: int) -> np.ndarray:  # + x_i to the new cluster, − x_i to the old one
        out = np.zeros((K, Xn.shape[1]))
        _moves_kernel(Xn, new, old, changed, a, b, out)
        return out

    return sums + torch.from_numpy(sum(_in_parts(part, len(changed), min_part=2048)))


def _nearest(C: torch.Tensor, X: torch.Tensor, spherical: bool, chunk_size: int) -> torch.Tensor:
    """argmax_k score, streamed in chunks: O(chunk·K) memory. Returns (N,) int64."""
    labels = torch.empty(X.shape[0], dtype=torch.int64)
    sq = (C * C).sum(1) if not spherical else None
    for a in range(0, X.shape[0], chunk_size):
        s = X[a:a + chunk_size] @ C.T  # (chunk, K)
        if sq is not None:
            s = 2 * s - sq
        labels[a:a + chunk_size] = s.argmax(1)
    return labels
