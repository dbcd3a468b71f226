"""ROME (Meng et al., 2022): a rank-one update of one layer, one fact at a time.

As in kmeng01/memit's ``rome/``: the target value lives at the output of the edited layer's MLP
(rome/compute_v.py:79-87), so ``v_init`` and the clamp ``clamp_norm_factor * ||v_init||`` and the
weight decay are measured on the MLP output, not the residual stream. The key ``k*`` is the flat mean
of the rewrite module's input over ROME's own context templates (rome/compute_u.py:83-90: every
template weighs 1/N; ``"{}"`` plus 10 generated prefixes of 5 tokens and 10 of 10, rome_main.py:213-236),
``u = C0^{-1} k*`` and the update is ``Delta = delta u^T / (u^T k)`` with ``k`` the key of the bare
prompt (rome/compute_v.py:181): afterwards ``W k = W_old k + delta`` exactly, and keys orthogonal to
``u`` under ``C0`` are untouched. Several requests are edited one after another, each on the model the
previous one left (rome_main.py:39-58).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import List

import torch

from editing.context import EditContext
from editing.keys import average_over_templates, request_templates, states_at_fact_tokens
from editing.hparams import LocateEditHyperParams
from editing.round import EditReport, second_moments_or_identity, timed
from editing.target_values import compute_target_values
from util.hparams import require
from util.weights import add_to_weight

LOG = logging.getLogger(__name__)


@dataclass
class ROMEHyperParams(LocateEditHyperParams):
    # ROME's own templates: "{}" and 10 prefixes of 5 tokens and 10 of 10 (hparams/ROME/gpt2-xl.json upstream).
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])

    def validate(self, source: str) -> None:
        super().validate(source)
        require(len(self.layers) == 1, source, "layers", "must name exactly one layer for ROME")
        require(bool(self.mlp_module_tmp) and "{}" in self.mlp_module_tmp, source, "mlp_module_tmp",
                "must name the MLP of a layer with '{}' for the layer number (ROME's target value is the MLP output)")


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
        # One group: ROME weighs every template alike, the bare prompt first.
        groups = [[t for group in context.context_templates(model, tok, hparams.context_template_length_params,
                                                            style="rome") for t in group]]
    for request in requests:
        with timed(report.seconds, "target_values"):
            values = compute_target_values(model, tok, [request], hparams, groups, z_layer=layer,
                                           prefix_cache=hparams.z_prefix_cache,
                                           edit_module=hparams.mlp_module_tmp.format(layer))
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
