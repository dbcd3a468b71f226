"""State carried between rounds of sequential editing: ``C_prev(l) = sum of K K^T`` of earlier rounds.

Methods that bound the accumulated edit (PRUNE) also keep the unedited weights of the edited modules
here (``originals``), so that a resumed run still measures the edit against the true original.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from rome.fact_tokens import compute_keys


@dataclass
class SequentialState:
    prev_moments: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_in, d_in] float64, CPU
    rounds: int = 0
    edits: int = 0
    # module name -> stored weight before the first round (CPU); empty for methods that do not need it.
    originals: Dict[str, torch.Tensor] = field(default_factory=dict)

    def prev_moment(self, layer: int) -> Optional[torch.Tensor]:
        return self.prev_moments.get(layer)

    def absorb_round(self, model, tok, requests, hparams, template_groups) -> None:
        """After a round: add ``K K^T`` of its keys, recomputed on the edited model, for every edited layer."""
        keys = compute_keys(model, tok, requests, hparams, hparams.layers, template_groups)
        for layer, k in keys.items():
            k = k.double().cpu()
            moment = k.T @ k
            self.prev_moments[layer] = moment if layer not in self.prev_moments else self.prev_moments[layer] + moment
        self.rounds += 1
        self.edits += len(requests)

    def state_dict(self) -> dict:
        return {"prev_moments": self.prev_moments, "rounds": self.rounds, "edits": self.edits,
                "originals": self.originals}

    @classmethod
    def from_state_dict(cls, values: dict) -> "SequentialState":
        # State files written before ``originals`` existed lack the key.
        return cls(prev_moments=dict(values["prev_moments"]), rounds=values["rounds"], edits=values["edits"],
                   originals=dict(values.get("originals") or {}))
