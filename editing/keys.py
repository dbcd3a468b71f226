"""Representations at the fact token: where the subject's last (or first) token sits in a prompt.

A prompt template holds ``{}`` where the subject goes. Positions are computed by tokenising the text up
to and including the subject, with the space before the subject moved onto the subject (as BPE
tokenisers see it in the full sentence), so the index is right with or without a BOS token. Batches are
padded on the right by ``util.tokens.pad_batch``, so positions counted from the left stay valid.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from editing.prefixes import after_prefixes, context_texts, shared_prefixes
from util.hooks import TraceDict, skip_modules
from util.models import hidden_states_only_kwargs, model_device
from util.tokens import chunks, pad_batch, prompt_ids


def _split_template(template: str, subject: str):
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must contain '{{}}' exactly once (for the subject {subject!r})")
    prefix, suffix = template.split("{}")
    spaced_subject = subject
    if prefix.endswith(" "):
        prefix, spaced_subject = prefix[:-1], " " + subject
    return prefix, spaced_subject, suffix


def fact_token_index(tok, template: str, subject: str, fact_token: str = "subject_last") -> int:
    """Index, in ``tok(template.format(subject))``, of the token the edit is keyed on."""
    if fact_token == "last":
        return len(prompt_ids(tok, template.format(subject))) - 1
    prefix, spaced_subject, _ = _split_template(template, subject)
    through_subject = len(prompt_ids(tok, prefix + spaced_subject))
    if fact_token == "subject_last":
        return through_subject - 1
    if fact_token == "subject_first":
        return through_subject - len(tok(spaced_subject, add_special_tokens=False)["input_ids"])
    raise ValueError(f"unknown fact_token {fact_token!r}; use subject_last, subject_first or last")


def expand_templates(context_templates: Sequence[str], prompt: str) -> List[str]:
    """Every context template wrapped around a request prompt (both hold ``{}``)."""
    return [context.format(prompt) for context in context_templates]


@dataclass
class LowerBlocks:
    """The output of the highest of ``blocks`` (a model's lowest blocks, bottom up) for each batch of one
    ``states_at_fact_tokens`` pass. A later pass over the same rows, while none of these blocks has changed,
    skips them all and starts from the kept outputs: MEMIT's layer loop edits one layer at a time, bottom up,
    so the blocks below the layer it edits next are as they were at its previous pass."""

    blocks: List[str]
    outputs: List[torch.Tensor] = field(default_factory=list)


@torch.no_grad()
def states_at_fact_tokens(
    model,
    tok,
    templates: Sequence[str],
    subjects: Sequence[str],
    fact_token: str,
    inputs_of: Sequence[str] = (),
    outputs_of: Sequence[str] = (),
    batch_size: int = 64,
    contexts: Sequence[str] = (),
    start_from: Optional[LowerBlocks] = None,
    keep: Optional[LowerBlocks] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Inputs of ``inputs_of`` and outputs of ``outputs_of`` at the fact token of each prompt.

    One forward per batch for all modules, stopping after the last of them, over each prompt's tokens up
    to its fact token only: in a causal model the tokens after it change nothing there. ``contexts``: texts
    that prompts begin with (``editing.prefixes.context_texts``), run once for all of them. ``start_from``:
    the outputs of lower blocks kept by an earlier pass over the same rows (those blocks are skipped);
    ``keep``: filled with this pass's outputs of its highest block (which must lie below the modules asked
    for). Returns two dicts ``{module: [n_prompts, d]}`` (inputs, outputs), each tensor on its module's device.
    """
    device = model_device(model)
    pairs = list(zip(templates, subjects))
    names = list(dict.fromkeys(list(inputs_of) + list(outputs_of)))
    kept = [keep.blocks[-1]] if keep is not None else []
    inputs: Dict[str, List[torch.Tensor]] = {name: [] for name in inputs_of}
    outputs: Dict[str, List[torch.Tensor]] = {name: [] for name in outputs_of}
    shared = shared_prefixes(model, tok, contexts, device)
    for number, batch in enumerate(chunks(pairs, batch_size)):
        index = torch.tensor([fact_token_index(tok, t, s, fact_token) for t, s in batch])
        rows = [prompt_ids(tok, t.format(s))[: int(i) + 1] for (t, s), i in zip(batch, index)]
        if shared is None:
            ids, mask = pad_batch(tok, rows, device=device)
            kwargs = {"input_ids": ids, "attention_mask": mask, **hidden_states_only_kwargs(model)}
        else:  # the fact token itself is never part of a shared prefix
            cut = after_prefixes(tok, rows, shared, device, within=index.tolist())
            kwargs = {**hidden_states_only_kwargs(model), **cut.forward_kwargs(model)}
            index = index - torch.tensor(cut.covered)
        with ExitStack() as stack:
            if start_from is not None:
                stack.enter_context(skip_modules(model, start_from.blocks, lambda: start_from.outputs[number]))
            traces = stack.enter_context(TraceDict(model, names + kept, retain_input=bool(inputs_of),
                                                   retain_output=bool(outputs_of or kept), stop=True))
            model(**kwargs)
        if keep is not None:
            keep.outputs.append(traces[kept[0]].output)
        for store, attr in ((inputs, "input"), (outputs, "output")):
            for name in store:
                value = getattr(traces[name], attr)
                store[name].append(value[torch.arange(len(batch), device=value.device), index.to(value.device)])
    return ({n: torch.cat(v) for n, v in inputs.items()}, {n: torch.cat(v) for n, v in outputs.items()})


def average_over_templates(states: torch.Tensor, template_groups: Sequence[Sequence[str]]) -> torch.Tensor:
    """``[n_requests * n_templates, d]`` -> ``[n_requests, d]``.

    MEMIT's weighting: average within each group of templates (e.g. the bare prompt; the generated
    prefixes of one length), then across groups.
    """
    sizes = [len(group) for group in template_groups]
    per_request = states.view(-1, sum(sizes), states.shape[-1])
    group_means = [part.mean(1) for part in per_request.split(sizes, dim=1)]
    return torch.stack(group_means).mean(0)


def compute_keys(model, tok, requests, hparams, layers: Sequence[int], template_groups) -> Dict[int, torch.Tensor]:
    """Key of each request at each layer: rewrite-module input at the fact token, averaged over templates.

    Returns ``{layer: [n_requests, d_in]}`` from one batched forward over all requests and templates.
    """
    templates, subjects = request_templates(requests, template_groups)
    names = [hparams.rewrite_module(layer) for layer in layers]
    states, _ = states_at_fact_tokens(model, tok, templates, subjects, hparams.fact_token, inputs_of=names,
                                      contexts=context_texts([t for group in template_groups for t in group]))
    return {layer: average_over_templates(states[name], template_groups) for layer, name in zip(layers, names)}


def request_templates(requests, template_groups) -> Tuple[List[str], List[str]]:
    """All (template, subject) rows for ``requests`` x flattened templates, request-major."""
    flat = [t for group in template_groups for t in group]
    templates, subjects = [], []
    for request in requests:
        templates += expand_templates(flat, request["prompt"])
        subjects += [request["subject"]] * len(flat)
    return templates, subjects
