"""Explain: which neurons of each edited layer hold a fact (docs/DESIGN.md section 5.7, step 1).

A neuron is an input dimension of the rewrite module (the MLP down-projection), i.e. one column of
``W : d_ff -> d_model``. Four scores, each ``[n_requests, d_ff]`` per layer:

- ``AS`` activation: ``|k_jn|``, the key (rewrite-module input at the fact token, template-averaged);
- ``WI`` weight importance: ``||W[:, n]||_1``, the same for every request;
- ``RS`` relevance: ``|k_jn| * ||W[:, n]||_1``, how much the neuron writes into the residual stream
  (upstream RS_main.py:124-128 sums ``k_jk * |W[k, n]|`` over the rows ``k`` of the stored weight,
  pairing an activation index with an output index; we keep the definition);
- ``GA`` gradient attribution: ``|k_jn * d log p(target_true) / d k_jn|`` at the fact token, averaged
  over the templates, or integrated gradients from a zero activation with ``ig_steps`` steps.

``select_neurons`` keeps the smallest top set holding ``neuron_threshold`` of the score mass.
"""
from __future__ import annotations

from typing import Dict, Sequence

import torch

from editing.keys import average_over_templates, compute_keys, fact_token_index, request_templates
from util.hooks import Trace, TraceDict
from util.models import model_device
from util.scoring import left_padded_logits, trailing_target_log_probs
from util.tokens import chunks, prompt_ids, target_ids
from util.weights import read_weight

SCORE_METHODS = ("AS", "WI", "RS", "GA")


def select_neurons(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices (ascending) of the fewest highest-scoring neurons whose score reaches ``threshold`` of the
    total (nucleus selection). ``threshold >= 1`` keeps every neuron, zeros included.

    The neuron that crosses the threshold is kept, as upstream ECE-WI does (WI_main.py:128, ``+ 2``), so
    the kept mass always reaches the threshold; upstream ECE-AS/RS stop before it (AS_main.py:124).
    """
    scores = scores.detach().float().flatten()
    if threshold >= 1.0 or float(scores.sum()) <= 0:
        return torch.arange(len(scores))
    ordered, order = torch.sort(scores, descending=True)
    cumulative = torch.cumsum(ordered, 0)
    count = int(torch.searchsorted(cumulative, threshold * cumulative[-1]).item()) + 1
    return torch.sort(order[: min(count, len(scores))].cpu()).values


def column_l1_norms(model, hparams, layer: int) -> torch.Tensor:
    """``||W[:, n]||_1`` for every input neuron ``n`` of the layer's rewrite module."""
    return read_weight(model, hparams.rewrite_module(layer)).float().abs().sum(0)


def neuron_scores(model, tok, requests, hparams, template_groups, method: str,
                  layers: Sequence[int] = ()) -> Dict[int, torch.Tensor]:
    """``{layer: [n_requests, d_ff]}`` non-negative scores of ``method`` (one of ``SCORE_METHODS``)."""
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown neuron score {method!r}; use one of {SCORE_METHODS}")
    layers = list(layers or hparams.layers)
    if method == "GA":
        return gradient_attribution(model, tok, requests, hparams, template_groups, layers, hparams.ig_steps)
    if method == "WI":
        return {l: column_l1_norms(model, hparams, l).expand(len(requests), -1).clone() for l in layers}
    keys = compute_keys(model, tok, requests, hparams, layers, template_groups)
    return {l: scores_from_keys(model, hparams, l, keys[l], method) for l in layers}


def scores_from_keys(model, hparams, layer: int, keys: torch.Tensor, method: str) -> torch.Tensor:
    """``AS`` or ``RS`` of one layer from keys ``[n_requests, d_in]`` already at hand, so that MEMIT's
    layer loop can score the keys it is about to solve with (as ECE-AS does, AS_main.py:116-121)."""
    if method == "AS":
        return keys.float().abs()
    if method == "RS":
        return keys.float().abs() * column_l1_norms(model, hparams, layer).to(keys.device)
    raise ValueError(f"neuron score {method!r} is not a function of the keys alone; only AS and RS are")


def _input_embedding_name(model) -> str:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding)


def gradient_attribution(model, tok, requests, hparams, template_groups, layers: Sequence[int],
                         ig_steps: int = 0, batch_size: int = 32) -> Dict[int, torch.Tensor]:
    """``|k * d log p(target_true)/dk|`` at the fact token for every edited layer, template-averaged.

    With ``ig_steps = 0`` one forward and backward per batch gives all layers at once (the embedding
    output is made to require grad, so each layer's gradient includes every path to the output).
    With ``ig_steps > 0`` each layer's fact-token activation is scaled by ``s / ig_steps`` and the
    gradients at those points are averaged (integrated gradients from a zero activation).
    """
    templates, subjects = request_templates(requests, template_groups)
    per_request = len(templates) // max(len(requests), 1)
    truths = [target_ids(tok, r["target_true"]["str"]) for r in requests for _ in range(per_request)]
    names = {l: hparams.rewrite_module(l) for l in layers}
    device = model_device(model)
    rows_out: Dict[int, list] = {l: [] for l in layers}
    # Batches of rows of similar length, so that little of each batch is padding (a round's context
    # templates differ by about ten tokens); the scores go back to the rows' own order below.
    prompts = [prompt_ids(tok, template.format(subject)) for template, subject in zip(templates, subjects)]
    by_length = sorted(range(len(templates)), key=lambda i: len(prompts[i]) + len(truths[i]))
    for batch in chunks(by_length, batch_size):
        wanted = [truths[i] for i in batch]
        rows = [prompts[i] + truths[i] for i in batch]
        width = max(map(len, rows))
        # Rows are padded on the left: a row's token j sits in column width - len(row) + j.
        fact = torch.tensor([width - len(row) + fact_token_index(tok, templates[i], subjects[i], hparams.fact_token)
                             for i, row in zip(batch, rows)])
        log_p = lambda: trailing_target_log_probs(
            left_padded_logits(model, tok, rows, max(map(len, wanted)) + 1, device), wanted)[0].sum()
        if ig_steps == 0:
            with torch.enable_grad():
                with Trace(model, _input_embedding_name(model), retain_output=False,
                           edit_output=lambda out: out.requires_grad_(True)), \
                        TraceDict(model, names.values(), retain_input=True, retain_output=False, detach=False) as traces:
                    total = log_p()
                inputs = [traces[names[l]].input for l in layers]
                grads = torch.autograd.grad(total, inputs)
            for l, k, g in zip(layers, inputs, grads):
                at = (torch.arange(len(batch), device=k.device), fact.to(k.device))
                rows_out[l].append((k[at].detach() * g[at]).abs().float())
            continue
        for l in layers:
            rows_out[l].append(_integrated_gradients(model, names[l], log_p, fact, ig_steps))
    in_row_order = torch.argsort(torch.tensor(by_length))
    return {l: average_over_templates(torch.cat(rows_out[l])[in_row_order.to(rows_out[l][0].device)], template_groups)
            for l in layers}


def _integrated_gradients(model, module_name, log_p, fact, steps: int) -> torch.Tensor:
    """``|k * mean_s dF/dx (at x = k * s / steps)|`` at the fact token of each row, for one module;
    ``log_p()`` runs the forward and returns F."""
    row = torch.arange(len(fact))
    total, key = None, None
    for s in range(1, steps + 1):
        scale = s / steps
        seen = {}

        def scaled(x: torch.Tensor) -> torch.Tensor:
            x = x.detach().clone()
            at = (row.to(x.device), fact.to(x.device))
            x[at] = x[at] * scale
            seen["x"] = x.requires_grad_(True)
            return seen["x"]

        with torch.enable_grad():
            with Trace(model, module_name, retain_output=False, edit_input=scaled):
                value = log_p()
            (grad,) = torch.autograd.grad(value, [seen["x"]])
        at = (row.to(grad.device), fact.to(grad.device))
        step_grad = grad[at].float()
        total = step_grad if total is None else total + step_grad
        if s == steps:
            key = seen["x"][at].detach().float()
    return (key * total / steps).abs()
