"""Spherical balanced k-means with exactly balanced final labels (paper §4.2, Table 9).

    from ddfm.kmeans import BalancedKMeans, TwoStageKMeans
    km = BalancedKMeans(16, random_state=0).fit(X)  # X: (N, D) float32
    km.labels_            # (N,) int64, cluster sizes differ by at most one
    km.fit_info_          # objective, sizes and seconds per iteration (data, not log lines)

The paper clusters unique-image features into K clusters "of equal sizes"; here the final
labels solve that balanced assignment exactly, as a transportation problem (dual prices,
then an exact repair by shortest paths). One module per job: ``scores.py`` (the (K, N)
score matrix and member sums), ``kernels.py`` (the numba kernels), ``prices.py`` (the dual
prices), ``assign.py`` (the exact balanced assignment), ``estimators.py``
(:class:`BalancedKMeans`) and ``two_stage.py`` (:class:`TwoStageKMeans`). The algorithm and
its guarantees are explained in docs/partitioning.md.
"""

from ddfm.kmeans.assign import balanced_assignment
from ddfm.kmeans.estimators import BalancedKMeans
from ddfm.kmeans.two_stage import (
    FAISS_MIN_POINTS_PER_CENTROID,
    TwoStageKMeans,
    spherical_kmeans,
    weighted_balanced_assignment,
)

__all__ = [
    "FAISS_MIN_POINTS_PER_CENTROID",
    "BalancedKMeans",
    "TwoStageKMeans",
    "balanced_assignment",
    "spherical_kmeans",
    "weighted_balanced_assignment",
]
