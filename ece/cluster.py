"""Cluster: group the requests whose selected neuron sets overlap (docs/DESIGN.md section 5.7, step 2).

The affinity of two requests is the Jaccard similarity of their selected neuron sets at the first
edited layer; spectral clustering (scikit-learn, precomputed affinity) groups them. The number of
clusters is fixed (``n_clusters``) or chosen by the largest eigengap of the normalised Laplacian, at
most ``max_clusters``. Never more clusters than distinct neuron sets: one request, or requests with
identical sets (always the case for ``WI``), make one cluster without calling scikit-learn.

The controls that ask whether neuron overlap helps (``cluster_by``): one cluster per relation
(``relation_clusters``), the neuron clusters' sizes with random members (``shuffled_clusters``), or one cluster.
"""
from __future__ import annotations

import logging
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from editing.requests import request_name
from editing.target_values import chunks_by_width
from util.errors import RequestError

LOG = logging.getLogger(__name__)


def jaccard_similarity(neuron_sets: Sequence[torch.Tensor], width: Optional[int] = None) -> np.ndarray:
    """``|A ∩ B| / |A ∪ B|`` for every pair of index sets (1 on the diagonal, and for two empty sets)."""
    width = width or (max((int(s.max()) + 1 for s in neuron_sets if len(s)), default=1))
    members = torch.zeros((len(neuron_sets), width), dtype=torch.float64)
    for row, indices in enumerate(neuron_sets):
        members[row, indices.long().cpu()] = 1.0
    intersection = members @ members.T
    sizes = members.sum(1)
    union = sizes[:, None] + sizes[None, :] - intersection
    similarity = torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union))
    return similarity.numpy()


def eigengap_cluster_count(affinity: np.ndarray, max_clusters: int) -> int:
    """The ``k <= max_clusters`` with the largest gap between eigenvalues ``k`` and ``k+1`` (1-based) of
    the symmetric normalised Laplacian."""
    n = len(affinity)
    degree = affinity.sum(1)
    inv_sqrt = 1.0 / np.sqrt(np.maximum(degree, 1e-12))
    laplacian = np.eye(n) - inv_sqrt[:, None] * affinity * inv_sqrt[None, :]
    eigenvalues = np.sort(np.linalg.eigvalsh(laplacian))
    upper = min(max_clusters, n - 1)
    if upper < 1:
        return 1
    gaps = eigenvalues[1 : upper + 1] - eigenvalues[:upper]
    return int(np.argmax(gaps)) + 1


def cluster_requests(neuron_sets: Sequence[torch.Tensor], n_clusters: Optional[int], max_clusters: int,
                     seed: int = 0, width: Optional[int] = None) -> np.ndarray:
    """A cluster label (``0..k-1``) for each request."""
    n = len(neuron_sets)
    if n == 0:
        return np.zeros(0, dtype=int)
    distinct = len({tuple(s.tolist()) for s in neuron_sets})
    affinity = jaccard_similarity(neuron_sets, width)
    wanted = n_clusters if n_clusters is not None else eigengap_cluster_count(affinity, max_clusters)
    k = max(1, min(wanted, distinct, n))
    if k == 1:
        return np.zeros(n, dtype=int)
    if k == n:
        return np.arange(n)
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "graph is not fully connected": still a valid split
        labels = SpectralClustering(n_clusters=k, affinity="precomputed", random_state=seed,
                                    assign_labels="cluster_qr").fit_predict(affinity)
    return _relabel(labels)


def relation_clusters(requests: Sequence[dict]) -> np.ndarray:
    """One cluster per CounterFact ``relation_id``; :class:`RequestError` naming the first request without one
    (EasyEdit records and the API's requests may have none)."""
    for index, request in enumerate(requests):
        if request.get("relation_id") is None:
            raise RequestError(f"{request_name(index, request.get('subject'))}, case_id {request.get('case_id')!r}: "
                               "no relation_id, which cluster_by \"relation\" groups by; use cluster_by \"neurons\" "
                               "(or another value) for requests without one")
    return _relabel(np.array([str(r["relation_id"]) for r in requests]))


def shuffled_clusters(labels: np.ndarray, seed: int) -> np.ndarray:
    """``labels`` moved to random requests: clusters of the same sizes whose members share nothing but chance."""
    return _relabel(labels[np.random.default_rng(seed).permutation(len(labels))])


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Labels numbered by first appearance, so that cluster 0 holds the first request."""
    mapping = {}
    return np.array([mapping.setdefault(label, len(mapping)) for label in labels.tolist()], dtype=int)


def optimisation_loops(labels: np.ndarray, z_batch_size: Optional[int],
                       widths: Optional[Sequence[int]] = None) -> List[List[int]]:
    """Request indices of each target-value loop: one per cluster, split into chunks of at most
    ``z_batch_size`` requests (bounding memory). With ``widths`` (per-request deltas only; a shared
    delta's members must stay as planned) each cluster is split in order of its rows' widths
    (``chunks_by_width``), so that loop-mates pad little; without, in the order of the requests."""
    loops = []
    for label in sorted(set(labels.tolist())):
        members = [i for i, l in enumerate(labels.tolist()) if l == label]
        loops += chunks_by_width(members, widths, z_batch_size)
    return loops
