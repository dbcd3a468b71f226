"""The least-squares update shared by MEMIT, AlphaEdit and ECE, and MEMIT's spreading over layers.

For layers ``l_1 .. l_m`` in order: recompute the keys ``K`` (``d_in x n``) on the model as it now
stands and the current outputs ``H`` at the last edited layer; spread the remaining residual
``R = (Z - H) / (m - i + 1)`` over the layers still to come; solve for ``Delta`` and add it. The
default solve is MEMIT's ``Delta = R K^T (lambda C0 + C_prev + K K^T)^{-1}``, in float64 with
``torch.linalg.solve``. Methods change only the solve (``Solver``) or what happens to ``Delta``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence

import torch

from editing.keys import LowerBlocks, average_over_templates, request_templates, states_at_fact_tokens
from editing.prefixes import context_texts
from util.weights import add_to_weight

LOG = logging.getLogger(__name__)

# solve(layer, keys [d_in, n], residuals [d_out, n]) -> Delta [d_out, d_in] (float64)
Solver = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]


def least_squares_delta(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    second_moment: torch.Tensor,
    mom2_update_weight: float,
    prev_moment: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``Delta = R K^T (lambda C0 + C_prev + K K^T)^{-1}`` in float64 on the keys' device.

    Minimises ``||Delta K - R||^2 + lambda * tr(Delta C0 Delta^T) + tr(Delta C_prev Delta^T)``: the keys
    move to their targets while the outputs of generic (and previously edited) keys move as little as
    possible.
    """
    device = keys.device
    k = keys.double()
    a = mom2_update_weight * second_moment.to(device, torch.float64) + k @ k.T
    if prev_moment is not None:
        a = a + prev_moment.to(device, torch.float64)
    # A is symmetric, so Delta^T = A^{-1} K R^T.
    return torch.linalg.solve(a, k @ residuals.to(device, torch.float64).T).T


@dataclass
class UpdateRecord:
    deltas: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> Delta [d_out, d_in]
    residual_norms: Dict[int, float] = field(default_factory=dict)  # layer -> mean ||Z - H|| before it


def spread_update_over_layers(
    model, tok, requests, hparams, targets: torch.Tensor, template_groups, solve: Solver,
    layers: Optional[Sequence[int]] = None,
) -> UpdateRecord:
    """MEMIT's layer loop. ``targets`` is ``[n, d_model]`` at the last edited layer."""
    layers = list(layers or hparams.layers)
    z_module = hparams.layer_module(layers[-1])
    templates, subjects = request_templates(requests, template_groups)
    per_request = sum(len(g) for g in template_groups)
    bare_rows = torch.arange(0, len(templates), per_request)  # the "{}" template comes first
    contexts = context_texts([t for group in template_groups for t in group])
    record = UpdateRecord()
    lower = None  # with z_below_cache, the blocks below the layer edited last run once per pass, not per layer
    for i, layer in enumerate(layers):
        rewrite = hparams.rewrite_module(layer)
        later = i < len(layers) - 1  # a pass keeps its lower blocks' output only for a pass after it
        keep = LowerBlocks([hparams.layer_module(b) for b in range(layer)]) if hparams.z_below_cache and layer and later \
            else None
        if lower is not None and len(lower.blocks) > layer:  # layers out of order: nothing below is unchanged
            lower = None
        inputs, outputs = states_at_fact_tokens(
            model, tok, templates, subjects, hparams.fact_token, inputs_of=[rewrite], outputs_of=[z_module],
            contexts=contexts, start_from=lower, keep=keep,
        )
        lower = keep
        keys = average_over_templates(inputs[rewrite], template_groups).T  # [d_in, n]
        current = outputs[z_module][bare_rows.to(outputs[z_module].device)]  # [n, d_model]
        error = targets.to(current.device) - current.float()
        residuals = (error / (len(layers) - i)).T  # [d_model, n]
        delta = solve(layer, keys, residuals)
        add_to_weight(model, rewrite, delta)
        record.deltas[layer] = delta
        record.residual_norms[layer] = float(error.norm(dim=1).mean())
        LOG.info("layer %d: mean residual %.3f, update norm %.3f", layer, record.residual_norms[layer],
                 float(delta.norm()))
    return record
