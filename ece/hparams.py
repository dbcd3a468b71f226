"""ECE's hyperparameters: MEMIT's, plus neuron selection, clustering and the batched target loop."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from editing.hparams import LocateEditHyperParams
from util.hparams import require

Z_MODES = ("per_request", "shared")
# What makes the clusters: neuron overlap (ECE), or the controls that tell whether it helps: the relation
# of each fact, the neuron clusters' sizes with random members, one cluster (docs/DESIGN.md 5.7, step 2).
CLUSTER_BY = ("neurons", "relation", "shuffled", "single")


@dataclass
class ECEHyperParams(LocateEditHyperParams):
    # Explain: nucleus selection keeps the top neurons holding this share of the score (1.0: all).
    neuron_threshold: float = 0.8
    # Explain: score each edited layer inside MEMIT's layer loop, over the round's requests, on the model
    # whose earlier layers already carry this round's update, as upstream ECE-AS/RS do
    # (AS_main.py:113-125, RS_main.py:113-137); false: score every layer once, before any update. WI
    # reads only the layer's own weight, which the earlier layers' updates leave alone: the same either way.
    score_layers_after_update: bool = True
    # GA only: integrated-gradient steps from a zero activation (0: plain gradient x activation).
    ig_steps: int = 0
    # Cluster: a fixed number of clusters, or None for the eigengap choice up to max_clusters; both apply to
    # cluster_by "neurons" and "shuffled" only.
    n_clusters: Optional[int] = None
    max_clusters: int = 10
    cluster_by: str = "neurons"
    # Batch-optimise: one delta per request, or one per cluster (ablation); at most z_batch_size
    # requests per loop. None: a cluster is one loop on a GPU; on a CPU, per_request clusters are split
    # into loops of editing.target_values.CPU_REQUESTS_PER_LOOP (the fastest size there; same values).
    z_mode: str = "per_request"
    z_batch_size: Optional[int] = None
    # Refinement: extra passes of the layer loop for requests whose remaining error ||z - h|| lies
    # in (alpha, upper_bound); max_iterations 1 means no refinement.
    max_iterations: int = 1
    alpha: float = 0.0
    upper_bound: Optional[float] = None

    def validate(self, source: str) -> None:
        super().validate(source)
        require(0.0 < self.neuron_threshold <= 1.0, source, "neuron_threshold", "must be in (0, 1]; 1.0 keeps every neuron")
        require(self.ig_steps >= 0, source, "ig_steps", "must be >= 0 (0: gradient x activation)")
        require(self.n_clusters is None or self.n_clusters >= 1, source, "n_clusters", "must be >= 1 or null (automatic)")
        require(self.max_clusters >= 1, source, "max_clusters", "must be >= 1")
        require(self.cluster_by in CLUSTER_BY, source, "cluster_by", f"must be one of {CLUSTER_BY}")
        require(self.z_mode in Z_MODES, source, "z_mode", f"must be one of {Z_MODES}")
        require(self.z_batch_size is None or self.z_batch_size >= 1, source, "z_batch_size", "must be >= 1 or null")
        require(self.max_iterations >= 1, source, "max_iterations", "must be >= 1 (1: no refinement)")
        require(self.alpha >= 0, source, "alpha", "must be >= 0")
        require(self.upper_bound is None or self.upper_bound > self.alpha, source, "upper_bound",
                "must be greater than alpha, or null (no upper bound)")
