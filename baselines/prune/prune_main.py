"""PRUNE (Ma et al., 2025) on MEMIT: bound the singular values of the accumulated edit after every round.

Sequential edits accumulate into ``E = W_now - W_orig`` whose largest singular values grow past those
of the weight itself and disturb unrelated inputs. Every singular value ``s > s_max`` of ``E`` (with
``s_max`` the largest singular value of ``W_orig``) becomes ``s_max + log(s / s_max)``; smaller ones,
which carry most edits, are kept. ``W_orig`` is remembered in the ``SequentialState`` so that the bound
refers to the unedited model across rounds and resumed runs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from baselines.memit.memit_main import MEMITHyperParams
from rome.context import EditContext
from rome.locate_edit import EditReport, locate_and_edit
from rome.sequential import SequentialState
from util.weights import load_weights, snapshot_weights, weight_parameter

LOG = logging.getLogger(__name__)


@dataclass
class PRUNEHyperParams(MEMITHyperParams):
    """MEMIT's keys: the restraint has no parameter of its own."""


def restrain_edit(original: torch.Tensor, current: torch.Tensor) -> Optional[torch.Tensor]:
    """``W_orig + E'`` (float64, on ``current``'s device), or None when no singular value of ``E`` exceeds
    ``s_max``. Singular values do not depend on the storage orientation, so stored weights can be passed."""
    w_orig = original.to(current.device, torch.float64)
    edit = current.to(torch.float64) - w_orig
    s_max = torch.linalg.matrix_norm(w_orig, ord=2)
    u, s, vh = torch.linalg.svd(edit, full_matrices=False)
    too_large = s > s_max
    if not bool(too_large.any()):
        return None
    bounded = torch.where(too_large, s_max + torch.log(s / s_max), s)
    return w_orig + (u * bounded) @ vh


def restrain_accumulated_edits(model, originals: Dict[str, torch.Tensor]) -> List[str]:
    """Apply ``restrain_edit`` to every module of ``originals``; returns the modules that changed."""
    restrained = []
    for name, original in originals.items():
        current = weight_parameter(model, name).detach()
        bounded = restrain_edit(original, current)
        if bounded is not None:
            load_weights(model, {name: bounded})
            restrained.append(name)
    LOG.info("PRUNE: restrained the accumulated edit of %s", restrained or "no module")
    return restrained


def apply_prune_to_model(
    model, tok, requests, hparams: PRUNEHyperParams, context: EditContext,
    state: Optional[SequentialState] = None,
) -> EditReport:
    """A MEMIT round followed by the restraint. Without ``state`` the weights before this round are the original."""
    modules = [hparams.rewrite_module(layer) for layer in hparams.layers]
    originals = state.originals if state is not None else {}
    originals.update(snapshot_weights(model, [m for m in modules if m not in originals]))
    edited = {m: originals[m] for m in modules}
    restrained: List[str] = []
    # Restrain before the state absorbs the round, so C_prev holds the keys of the restrained model.
    report = locate_and_edit(model, tok, requests, hparams, context, state,
                             requests_per_loop=hparams.z_requests_per_loop,
                             after_update=lambda record: restrained.extend(restrain_accumulated_edits(model, edited)))
    report.extra["restrained_modules"] = restrained
    return report
