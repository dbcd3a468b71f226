"""PRUNE (Ma et al., 2025) on MEMIT: bound the singular values of the accumulated edit.

Sequential edits accumulate into ``E`` whose largest singular values grow past those of the weight
itself and disturb unrelated inputs. Every singular value ``s > s_max`` of ``E`` (``s_max``: the largest
singular value of ``W_orig``) becomes ``F(s) = s_max + log(s / s_max)``; smaller ones, which carry most
edits, are kept.

The restraint never compounds: the state keeps the raw sum of the rounds' MEMIT updates ``E_raw`` and
the weight is set to ``W_orig + F(E_raw)`` (applying ``F`` to an already restrained edit every round
would drive every large singular value to a hard cap at ``s_max``). ``prune_schedule``:

- ``every_round`` (default): after each round, so every evaluation sees the bounded model;
- ``after_last_round``: once, after the last round, as AlphaEdit's experiments/evaluate.py:298-333
  runs it. That file adds ``F(E)`` to the already edited weight (``W_orig + E + F(E)``); here the
  weight becomes ``W_orig + F(E)``, which is what the method describes.

The rounds themselves are plain MEMIT rounds without ``C_prev`` (AlphaEdit's evaluate.py:245).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from baselines.memit.memit_main import MEMITHyperParams
from editing.context import EditContext
from editing.round import EditReport, locate_and_edit
from editing.sequential import SequentialState
from util.hparams import require
from util.weights import load_weights, snapshot_weights

LOG = logging.getLogger(__name__)

PRUNE_SCHEDULES = ("every_round", "after_last_round")


@dataclass
class PRUNEHyperParams(MEMITHyperParams):
    """MEMIT's keys and when the restraint applies."""

    prune_schedule: str = "every_round"

    def validate(self, source: str) -> None:
        super().validate(source)
        require(self.prune_schedule in PRUNE_SCHEDULES, source, "prune_schedule", f"must be one of {PRUNE_SCHEDULES}")


def restrain(edit: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``F(E)`` (float64, on ``edit``'s device): singular values above ``s_max = ||W_orig||_2`` become
    ``s_max + log(s / s_max)``; ``E`` itself when none is above. Singular values do not depend on the
    storage orientation."""
    edit = edit.to(torch.float64)
    s_max = torch.linalg.matrix_norm(original.to(edit.device, torch.float64), ord=2)
    u, s, vh = torch.linalg.svd(edit, full_matrices=False)
    if not bool((s > s_max).any()):
        return edit
    bounded = torch.where(s > s_max, s_max + torch.log(s / s_max), s)
    return (u * bounded) @ vh


def set_restrained_weights(model, state: SequentialState) -> List[str]:
    """``W = W_orig + F(E_raw)`` for every module of the state; returns the modules where ``F`` changed ``E_raw``."""
    restrained = []
    for name, original in state.originals.items():
        raw = state.raw_edits[name].to(torch.float64)
        bounded = restrain(raw, original)
        if bounded is not raw:
            restrained.append(name)
        load_weights(model, {name: original.to(bounded.device, torch.float64) + bounded})
    LOG.info("PRUNE: restrained the accumulated edit of %s", restrained or "no module")
    return restrained


def apply_prune_to_model(
    model, tok, requests, hparams: PRUNEHyperParams, context: EditContext,
    state: Optional[SequentialState] = None,
) -> EditReport:
    """A MEMIT round; its update joins ``E_raw`` and the weight becomes ``W_orig + F(E_raw)`` (per schedule).
    Without ``state`` (a non-sequential run) the weights before this round are the original."""
    state = state if state is not None else SequentialState(track_prev_moments=False)
    modules = [hparams.rewrite_module(layer) for layer in hparams.layers]
    state.originals.update(snapshot_weights(model, [m for m in modules if m not in state.originals]))
    before = snapshot_weights(model, modules)
    restrained: List[str] = []

    def accumulate(record) -> None:
        after = snapshot_weights(model, modules)
        for name in modules:
            update = after[name].double() - before[name].double()
            state.raw_edits[name] = state.raw_edits[name] + update if name in state.raw_edits else update
        if hparams.prune_schedule == "every_round":
            restrained.extend(set_restrained_weights(model, state))

    # Bound before the state absorbs the round, so any keys it records come from the bounded model.
    report = locate_and_edit(model, tok, requests, hparams, context, state,
                             requests_per_loop=hparams.z_requests_per_loop, after_update=accumulate)
    report.extra["restrained_modules"] = restrained
    return report


def finish_prune(model, hparams: PRUNEHyperParams, state: SequentialState) -> Dict[str, List[str]]:
    """After the last round: with ``after_last_round``, set ``W = W_orig + F(E_raw)`` once."""
    if hparams.prune_schedule != "after_last_round" or state.finished:
        return {"restrained_modules": []}
    restrained = set_restrained_weights(model, state)
    state.finished = True
    return {"restrained_modules": restrained}
