"""MEMIT (Meng et al., 2023): target values at the last edited layer, least squares spread over layers.

Non-sequential MEMIT is MEMIT_seq with no ``state``; with a ``SequentialState`` the covariance of all
earlier rounds' keys (``C_prev``) joins the regulariser.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from editing.context import EditContext
from editing.hparams import LocateEditHyperParams
from editing.round import EditReport, locate_and_edit
from editing.sequential import SequentialState
from util.hparams import require


@dataclass
class MEMITHyperParams(LocateEditHyperParams):
    # Requests whose target values share one optimisation loop. MEMIT's published schedule is one
    # loop per request (1); the values are the same for any setting, only the speed changes.
    z_requests_per_loop: int = 1

    def validate(self, source: str) -> None:
        super().validate(source)
        require(self.z_requests_per_loop >= 1, source, "z_requests_per_loop", "must be >= 1")


def apply_memit_to_model(
    model, tok, requests, hparams: MEMITHyperParams, context: EditContext,
    state: Optional[SequentialState] = None,
) -> EditReport:
    """Edit ``model`` in place; returns timings. Pass ``state`` for sequential editing (MEMIT_seq)."""
    return locate_and_edit(model, tok, requests, hparams, context, state,
                           requests_per_loop=hparams.z_requests_per_loop)
