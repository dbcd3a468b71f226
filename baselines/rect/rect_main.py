"""RECT (Gu et al., 2024) on MEMIT: keep only the update entries that change their weight the most.

Large sequential edits hurt general abilities mostly through many small relative changes. As in the
reference (ECE's and AlphaEdit's memit/memit_rect_main.py:40-61): run a whole, unmasked MEMIT pass over
all layers, put the weights back, and add to each layer only the entries of its final update ``Delta``
whose relative size ``|Delta / (W + eps)|`` reaches the ``(100 - top_k_percent)``-th percentile
(``torch.kthvalue`` with ``k = int(numel * (100 - top_k_percent) / 100)``; W: the weight before the
round). Masking inside the layer loop instead would let later layers make up for the dropped entries.
The rounds are plain MEMIT rounds without ``C_prev`` (AlphaEdit experiments/evaluate.py:245).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from baselines.memit.memit_main import MEMITHyperParams
from editing.context import EditContext
from editing.round import EditReport, locate_and_edit
from editing.sequential import SequentialState
from util.hparams import require
from util.weights import add_to_weight, load_weights, read_weight, snapshot_weights

# The reference's epsilon in |Delta / (W + eps)| (memit_rect_main.py:49).
RELATIVE_EPS = 1e-8


@dataclass
class RECTHyperParams(MEMITHyperParams):
    top_k_percent: float = 40.0  # share of each update's entries that is kept (the reference's k_percent = 40)

    def validate(self, source: str) -> None:
        super().validate(source)
        require(0 < self.top_k_percent <= 100, source, "top_k_percent", "must be in (0, 100]")


def keep_top_relative_entries(delta: torch.Tensor, weight: torch.Tensor, top_k_percent: float) -> torch.Tensor:
    """``delta`` with the entries whose ``|delta / (weight + eps)|`` is below the reference's threshold zeroed."""
    k = int(delta.numel() * (100 - top_k_percent) / 100)
    if k < 1:
        return delta
    relative = (delta / (weight.to(delta.device, delta.dtype) + RELATIVE_EPS)).abs()
    threshold = torch.kthvalue(relative.flatten(), k).values
    return delta * (relative >= threshold)


def apply_rect_to_model(
    model, tok, requests, hparams: RECTHyperParams, context: EditContext,
    state: Optional[SequentialState] = None,
) -> EditReport:
    """An unmasked MEMIT round, undone, then each layer's masked final update applied; ``state`` counts rounds."""
    modules = {layer: hparams.rewrite_module(layer) for layer in hparams.layers}
    before = snapshot_weights(model, modules.values())
    kept = {}

    def mask_final_updates(record) -> None:
        load_weights(model, before)
        for layer, name in modules.items():
            weight = read_weight(model, name).detach()
            masked = keep_top_relative_entries(record.deltas[layer].to(weight.device), weight, hparams.top_k_percent)
            add_to_weight(model, name, masked)
            kept[str(layer)] = int((masked != 0).sum())

    report = locate_and_edit(model, tok, requests, hparams, context, state,
                             requests_per_loop=hparams.z_requests_per_loop, after_update=mask_final_updates)
    report.extra["kept_entries"] = kept
    return report
