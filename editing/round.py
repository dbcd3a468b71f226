"""The locate-and-edit round shared by MEMIT and its sequential relatives.

statistics -> context templates -> target values -> layer-by-layer least squares -> sequential state.
A method passes its own ``make_solver`` (how ``Delta`` is solved) and nothing else.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional

import torch

from editing.context import EditContext
from editing.sequential import SequentialState
from editing.target_values import TargetValues, compute_target_values
from editing.update import Solver, UpdateRecord, least_squares_delta, spread_update_over_layers
from util.weights import read_weight

LOG = logging.getLogger(__name__)


@dataclass
class EditReport:
    """What one editing round did and how long each stage took (seconds)."""

    seconds: Dict[str, float] = field(default_factory=dict)
    target_loops: int = 0
    target_steps: list = field(default_factory=list)
    target_forward_tokens: int = 0  # tokens computed with gradients in the target loops (work done)
    residual_norms: Dict[int, float] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    # A method's account of the round (ECE: neurons, clusters); written to its own file, not per case.
    explanation: Optional[dict] = None

    def to_dict(self) -> dict:
        return {"seconds": self.seconds, "target_loops": self.target_loops, "target_steps": self.target_steps,
                "target_forward_tokens": self.target_forward_tokens,
                "residual_norms": {str(k): v for k, v in self.residual_norms.items()}, **self.extra}


@contextmanager
def timed(seconds: Dict[str, float], stage: str):
    """Add the wall time of the block to ``seconds[stage]`` (synchronising CUDA so GPU work counts)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        yield
    finally:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - start


def second_moments_or_identity(model, tok, hparams, context: EditContext) -> Dict[int, torch.Tensor]:
    if hparams.mom2_adjustment:
        return context.second_moments(model, tok, hparams, hparams.layers)
    return {l: torch.eye(read_weight(model, hparams.rewrite_module(l)).shape[1]) for l in hparams.layers}


def memit_solver(hparams, second_moments, state: Optional[SequentialState]) -> Solver:
    def solve(layer, keys, residuals):
        prev = state.prev_moment(layer) if state is not None else None
        return least_squares_delta(keys, residuals, second_moments[layer], hparams.mom2_update_weight, prev)

    return solve


def locate_and_edit(
    model, tok, requests, hparams, context: EditContext, state: Optional[SequentialState] = None,
    make_solver: Callable = memit_solver, requests_per_loop: Optional[int] = 1,
    after_update: Optional[Callable[[UpdateRecord], None]] = None,
) -> EditReport:
    """One round of MEMIT-style editing of ``requests``; updates ``state`` when given (sequential)."""
    report = EditReport()
    with timed(report.seconds, "statistics"):
        second_moments = second_moments_or_identity(model, tok, hparams, context)
    with timed(report.seconds, "templates"):
        groups = context.context_templates(model, tok, hparams.context_template_length_params)
    with timed(report.seconds, "target_values"):
        values: TargetValues = compute_target_values(
            model, tok, requests, hparams, groups, z_layer=hparams.layers[-1], requests_per_loop=requests_per_loop,
            prefix_cache=hparams.z_prefix_cache,
        )
    with timed(report.seconds, "update"):
        record = spread_update_over_layers(
            model, tok, requests, hparams, values.targets, groups, make_solver(hparams, second_moments, state)
        )
        if after_update is not None:
            after_update(record)
        if state is not None:
            state.absorb_round(model, tok, requests, hparams, groups)
    report.target_loops, report.target_steps = values.loops, values.steps
    report.target_forward_tokens = values.forward_tokens
    report.residual_norms = record.residual_norms
    return report
