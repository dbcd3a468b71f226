"""ROME (Meng et al., 2022): a rank-one update of one layer, one fact at a time.

With ``k*`` the key averaged over the context templates, ``u = C0^{-1} k*`` and ``delta`` the target
change of the layer's output at the fact token (found by the shared target-value optimisation at that
layer), the update is ``Delta = delta u^T / (u^T k)``, with ``k`` the key of the bare prompt: afterwards
``W k = W_old k + delta`` exactly, and keys orthogonal to ``u`` under ``C0`` are untouched.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from rome.context import EditContext
from rome.fact_tokens import average_over_templates, request_templates, states_at_fact_tokens
from rome.hparams import LocateEditHyperParams
from rome.locate_edit import EditReport, second_moments_or_identity, timed
from rome.target_values import compute_target_values
from util.hparams import require
from util.weights import add_to_weight

LOG = logging.getLogger(__name__)


@dataclass
class ROMEHyperParams(LocateEditHyperParams):
    def validate(self, source: str) -> None:
        super().validate(source)
        require(len(self.layers) == 1, source, "layers", "must name exactly one layer for ROME")


def rank_one_delta(key_average: torch.Tensor, key_bare: torch.Tensor, delta: torch.Tensor,
                   second_moment: torch.Tensor) -> torch.Tensor:
    """``Delta = delta u^T / (u^T k)`` with ``u = C0^{-1} k*``, in float64. Shapes: keys ``[d_in]``, delta ``[d_out]``."""
    device = key_average.device
    u = torch.linalg.solve(second_moment.to(device, torch.float64), key_average.double())
    return torch.outer(delta.to(device, torch.float64), u) / torch.dot(u, key_bare.double())


def apply_rome_to_model(
    model, tok, requests, hparams: ROMEHyperParams, context: EditContext, state=None,
) -> EditReport:
    """Edit each request in turn (each on the model left by the previous one)."""
    if state is not None:
        raise ValueError("ROME has no sequential state; run it without C_prev (it edits one fact at a time)")
    report = EditReport()
    layer = hparams.layers[0]
    rewrite = hparams.rewrite_module(layer)
    with timed(report.seconds, "statistics"):
        second_moment = second_moments_or_identity(model, tok, hparams, context)[layer]
    with timed(report.seconds, "templates"):
        groups = context.context_templates(model, tok, hparams.context_template_length_params)
    for request in requests:
        with timed(report.seconds, "target_values"):
            values = compute_target_values(model, tok, [request], hparams, groups, z_layer=layer,
                                           prefix_cache=hparams.z_prefix_cache)
        with timed(report.seconds, "update"):
            templates, subjects = request_templates([request], groups)
            inputs, _ = states_at_fact_tokens(model, tok, templates, subjects, hparams.fact_token, inputs_of=[rewrite])
            key_average = average_over_templates(inputs[rewrite], groups)[0]
            key_bare = inputs[rewrite][0]
            delta = (values.targets - values.initial)[0]
            add_to_weight(model, rewrite, rank_one_delta(key_average, key_bare, delta, second_moment))
        report.target_loops += values.loops
        report.target_steps += values.steps
    return report
