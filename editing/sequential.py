"""State carried between rounds of sequential editing.

``C_prev(l) = sum of K K^T`` over earlier rounds, for the methods that keep it (MEMIT_seq, AlphaEdit,
ECE). The plain sequential rows of AlphaEdit's tables (MEMIT, PRUNE, RECT) keep the edits but not
``C_prev`` (AlphaEdit experiments/evaluate.py:245 passes ``cache_c`` only to AlphaEdit, MEMIT_seq and
NSE): their state has ``track_prev_moments=False`` and never computes or stores it.

Methods that bound the accumulated edit (PRUNE) also keep the unedited weights of the edited modules
(``originals``) and the unbounded sum of the round updates (``raw_edits``), so that a resumed run
still measures the edit against the true original.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from editing.keys import compute_keys


@dataclass
class SequentialState:
    prev_moments: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [d_in, d_in] float64, CPU
    rounds: int = 0
    edits: int = 0
    # module name -> stored weight before the first round (CPU); empty for methods that do not need it.
    originals: Dict[str, torch.Tensor] = field(default_factory=dict)
    # module name -> sum of the rounds' updates before any restraint (stored orientation, CPU, float64).
    raw_edits: Dict[str, torch.Tensor] = field(default_factory=dict)
    track_prev_moments: bool = True
    finished: bool = False  # a method's after-the-last-round step has run (PRUNE applied once)

    def prev_moment(self, layer: int) -> Optional[torch.Tensor]:
        return self.prev_moments.get(layer)

    def absorb_round(self, model, tok, requests, hparams, template_groups) -> None:
        """After a round: count it and, when tracked, add ``K K^T`` of its keys (recomputed on the edited model)."""
        if self.track_prev_moments:
            keys = compute_keys(model, tok, requests, hparams, hparams.layers, template_groups)
            for layer, k in keys.items():
                k = k.double().cpu()
                moment = k.T @ k
                self.prev_moments[layer] = moment if layer not in self.prev_moments else self.prev_moments[layer] + moment
        self.rounds += 1
        self.edits += len(requests)

    def state_dict(self) -> dict:
        return {"prev_moments": self.prev_moments, "rounds": self.rounds, "edits": self.edits,
                "originals": self.originals, "raw_edits": self.raw_edits,
                "track_prev_moments": self.track_prev_moments, "finished": self.finished}

    @classmethod
    def from_state_dict(cls, values: dict) -> "SequentialState":
        # State files written before a key existed lack it.
        return cls(prev_moments=dict(values["prev_moments"]), rounds=values["rounds"], edits=values["edits"],
                   originals=dict(values.get("originals") or {}), raw_edits=dict(values.get("raw_edits") or {}),
                   track_prev_moments=values.get("track_prev_moments", True),
                   finished=values.get("finished", False))
