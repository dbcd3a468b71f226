"""RECT (Gu et al., 2024) on MEMIT: keep only the update entries that change their weight the most.

Large sequential edits hurt general abilities mostly through many small relative changes; RECT keeps
the entries of ``Delta`` whose relative magnitude ``|Delta| / (|W| + eps)`` is in the top
``top_k_percent`` (W: the weight before the update) and zeroes the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from baselines.memit.memit_main import MEMITHyperParams
from rome.context import EditContext
from rome.locate_edit import EditReport, locate_and_edit, memit_solver
from rome.sequential import SequentialState
from rome.update import Solver
from util.hparams import require
from util.weights import read_weight

# Keeps the ratio finite for weights that are exactly zero; far below any trained weight's magnitude.
RELATIVE_EPS = 1e-8


@dataclass
class RECTHyperParams(MEMITHyperParams):
    top_k_percent: float = 40.0  # share of each update's entries that is kept (published default 40%)

    def validate(self, source: str) -> None:
        super().validate(source)
        require(0 < self.top_k_percent <= 100, source, "top_k_percent", "must be in (0, 100]")


def keep_top_relative_entries(delta: torch.Tensor, weight: torch.Tensor, top_k_percent: float) -> torch.Tensor:
    """``delta`` with all but the ``top_k_percent`` largest ``|delta| / (|weight| + eps)`` entries zeroed."""
    kept = math.ceil(delta.numel() * top_k_percent / 100)
    if kept >= delta.numel():
        return delta
    relative = delta.abs() / (weight.to(delta.device, delta.dtype).abs() + RELATIVE_EPS)
    mask = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
    mask[torch.topk(relative.flatten(), kept, sorted=False).indices] = True
    return delta * mask.view_as(delta)


def rect_solver(model, hparams: RECTHyperParams, second_moments, state: Optional[SequentialState]) -> Solver:
    """MEMIT's solve, then the relative top-k mask against the current weight (read before it changes)."""
    solve_memit = memit_solver(hparams, second_moments, state)

    def solve(layer, keys, residuals):
        delta = solve_memit(layer, keys, residuals)
        return keep_top_relative_entries(delta, read_weight(model, hparams.rewrite_module(layer)).detach(),
                                         hparams.top_k_percent)

    return solve


def apply_rect_to_model(
    model, tok, requests, hparams: RECTHyperParams, context: EditContext,
    state: Optional[SequentialState] = None,
) -> EditReport:
    """Edit ``model`` in place; pass ``state`` for sequential editing."""
    return locate_and_edit(model, tok, requests, hparams, context, state,
                           make_solver=lambda hp, second_moments, st: rect_solver(model, hp, second_moments, st),
                           requests_per_loop=hparams.z_requests_per_loop)
