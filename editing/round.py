"""The locate-and-edit round shared by MEMIT, its sequential relatives and ECE.

statistics -> context templates -> [plan_loops] -> target values -> layer-by-layer least squares
-> [refine] -> [after_update] -> sequential state.

A method changes the round only through its arguments: ``make_solver`` (how ``Delta`` is solved),
``requests_per_loop`` or ``plan_loops`` and ``shared_delta`` (which requests share a target-value loop),
``refine`` (more passes of the layer loop) and ``after_update`` (what happens to the finished update).
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

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


# plan_loops(template_groups, seconds) -> request indices of each target-value loop; the hook times its
# own stages into ``seconds`` (ECE: "explain" and "cluster").
LoopPlanner = Callable[[list, Dict[str, float]], Sequence[Sequence[int]]]
# refine(values, solve, template_groups): runs after the first pass of the layer loop, before the state
# absorbs the round (ECE: passes of the layer loop for the requests still far from their targets).
Refinement = Callable[[TargetValues, Solver, list], None]


def locate_and_edit(
    model, tok, requests, hparams, context: EditContext, state: Optional[SequentialState] = None,
    make_solver: Callable = memit_solver, requests_per_loop: Optional[int] = 1,
    plan_loops: Optional[LoopPlanner] = None, shared_delta: bool = False,
    refine: Optional[Refinement] = None, after_update: Optional[Callable[[UpdateRecord], None]] = None,
) -> EditReport:
    """One round of MEMIT-style editing of ``requests``; updates ``state`` when given (sequential).

    The target loops are chunks of ``requests_per_loop`` requests unless ``plan_loops`` decides them;
    ``shared_delta`` gives each loop one delta. ``after_update(record)`` sees the first pass's update
    record and the weights after every pass.
    """
    report = EditReport()
    with timed(report.seconds, "statistics"):
        second_moments = second_moments_or_identity(model, tok, hparams, context)
    with timed(report.seconds, "templates"):
        groups = context.context_templates(model, tok, hparams.context_template_length_params)
    loops = plan_loops(groups, report.seconds) if plan_loops is not None else None
    with timed(report.seconds, "target_values"):
        values: TargetValues = compute_target_values(
            model, tok, requests, hparams, groups, z_layer=hparams.layers[-1], requests_per_loop=requests_per_loop,
            loops=loops, shared_delta=shared_delta, prefix_cache=hparams.z_prefix_cache,
        )
    with timed(report.seconds, "update"):
        solve = make_solver(hparams, second_moments, state)
        record = spread_update_over_layers(model, tok, requests, hparams, values.targets, groups, solve)
        if refine is not None:
            refine(values, solve, groups)
        if after_update is not None:
            after_update(record)
        if state is not None:
            state.absorb_round(model, tok, requests, hparams, groups)
    report.target_loops, report.target_steps = values.loops, values.steps
    report.target_forward_tokens = values.forward_tokens
    report.residual_norms = record.residual_norms
    return report
