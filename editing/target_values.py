"""Target values ``z_j = h_j + delta_j`` at the last edited layer, many requests in one loop.

For each request, ``delta_j`` is added to the residual stream (output of decoder layer ``z_layer``;
for ROME, to the output of that layer's MLP, ``edit_module``) at
the fact token of every prompt of that request, and optimised with Adam to minimise

    NLL(target_new | template + prompt), averaged over the context templates
    + kl_factor * KL(p || p_0) of the next-token distribution at the fact token of "{subject} is a"
    + v_weight_decay * ||delta_j|| / ||h_j||^2

where the loss is read at ``v_loss_layer`` through the final norm and the output embedding, only at
the positions that predict target tokens (not over the whole sequence and vocabulary). The KL term is
the current distribution ``p`` against the unedited ``p_0``, as MEMIT's
``kl_div(kl_distr_init, kl_log_probs, log_target=True)`` computes it (memit/compute_z.py:149-151,
rome/compute_v.py:137-139 in kmeng01/memit). Each request
stops when its own loss falls below ``v_stop_loss`` or, with ``v_stop_most_probable_steps = k``, once
every target token has been the most probable token on every one of the request's prompts at ``k``
steps, not necessarily consecutive (ENCORE's most-probable early stopping, encore/compute_z.py:167-193 in
scalable-model-editing/knowledge-editing-regularization, which leaves the first prompt out of the
check; here every prompt counts), or, with ``v_stop_nll``, once the NLL term alone is below that. Its
delta is then frozen and its rows leave the batch while the others go on. Requests never interact
(separate rows, separate deltas; Adam is element-wise), so one loop over many requests gives the same
values as one loop per request, only with fewer, larger forward passes.

Tokens before the fact token do not depend on any delta (the model is causal), so by default their
keys and values are computed once, before the loop, and every step runs only the rest of each row
(``prefix_cache``): the same values, with a fraction of the tokens per step. Likewise no layer up to
``z_layer`` depends on a delta (it is added to that layer's output), so by default (``z_below_cache``)
the output of layer ``z_layer`` is computed once per loop and every step runs only the layers above it.
The context templates' own tokens are computed once per call for every loop (``editing/prefixes.py``).
``z_compile`` runs those layers as ``torch.compile``'d code (equal values up to float rounding).
``z_dtype`` computes their matrix products, and the output head's, in bfloat16 (values move by its rounding;
``auto``: where the device multiplies bfloat16 natively).
``z_devices`` runs the loops on several devices at once, one model copy each (``editing/replicas.py``).

``shared_delta=True`` (ECE's ``z_mode: shared`` ablation) gives every loop one delta for all its
requests: it minimises their mean loss, a member leaves when its loss is below the stopping loss, and
its norm is clamped against the smallest ``||h_j||`` of the loop.
"""
from __future__ import annotations

import logging
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch

from editing.keys import expand_templates, fact_token_index
from editing.prefixes import SharedPrefixes, after_prefixes, cache_kwargs, context_texts, model_cache, shared_prefixes
from editing.replicas import assign_loops, loop_devices, replicas_for, split_for_devices
from util.hooks import Trace, compiled_modules, get_module, low_precision_products, skip_modules
from util.models import hidden_states_only_kwargs, model_device
from util.tokens import chunks, pad_batch, pad_token_id, prompt_ids, target_ids

LOG = logging.getLogger(__name__)

KL_PROMPT = "{} is a"

# Requests per target loop on a CPU when the hparams leave it open. Measured on smollm2-135m, 2 cores,
# 3 fixed steps: loops of 5, 10 or 20 requests take 0.26 s per request and step against 0.47 s for one
# request per loop, 40 take 0.29 s and 100 in one loop 0.46 s with 11.5 GB resident: past a few hundred
# rows the activations no longer fit the caches. A GPU is fastest with everything in one loop.
CPU_REQUESTS_PER_LOOP = 10


def default_requests_per_loop(model) -> Optional[int]:
    """Requests per target loop for the model's device: ``CPU_REQUESTS_PER_LOOP`` on a CPU, all on a GPU."""
    return CPU_REQUESTS_PER_LOOP if model_device(model).type == "cpu" else None


def fast_bfloat16(device: torch.device) -> bool:
    """Does ``device`` multiply bfloat16 matrices natively (a GPU that supports it, a CPU with AMX tiles)?"""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    return False


def products_dtype(z_dtype: Optional[str], model) -> Optional[torch.dtype]:
    """The dtype of the target loop's matrix products, or ``None`` for the model's own. ``"auto"``: bfloat16
    for a float32 model on a device with fast bfloat16 products (``fast_bfloat16``), else the model's own."""
    model_dtype = next(model.parameters()).dtype
    if z_dtype == "auto":
        use_bfloat16 = model_dtype == torch.float32 and fast_bfloat16(model_device(model))
        dtype = torch.bfloat16 if use_bfloat16 else None
    else:
        dtype = getattr(torch, z_dtype) if z_dtype else None
    return None if dtype == model_dtype else dtype


@dataclass
class TargetValues:
    targets: torch.Tensor  # [n, d_model]: h + delta
    initial: torch.Tensor  # [n, d_model]: h, the unedited output at the fact token (bare prompt)
    steps: List[int] = field(default_factory=list)  # optimisation steps taken by each request
    losses: List[float] = field(default_factory=list)  # last loss of each request
    loops: int = 0  # optimisation loops run
    loop_of: List[int] = field(default_factory=list)  # which loop optimised each request
    forward_rows: int = 0  # token rows pushed through the model, summed over all steps (work done)
    forward_tokens: int = 0  # tokens computed with gradients, summed over all steps (cached prefixes excluded)


@dataclass
class _Batch:
    """Token rows of one loop: per request, one row per template and one KL row (request-major).

    Every index refers to the request's position in the loop (``0..n-1``), so a sub-batch of the
    requests still optimising (``select``) keeps addressing the same deltas.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    fact_positions: torch.Tensor  # per row
    row_request: torch.Tensor  # request of every row
    first_rows: torch.Tensor  # for each request, its bare-prompt row (the first template)
    token_rows: torch.Tensor  # one entry per predicted target token
    token_positions: torch.Tensor
    token_ids: torch.Tensor
    token_weights: torch.Tensor  # 1 / (target length * templates): sums to 1 per request
    token_request: torch.Tensor
    kl_rows: torch.Tensor
    kl_positions: torch.Tensor
    kl_request: torch.Tensor
    # With a prefix cache: input_ids hold each row from its fact token on, attention_mask covers the
    # cached prefix (prefix_width columns) and then those tokens, and positions are given explicitly.
    position_ids: Optional[torch.Tensor] = None
    prefix: Optional[List[Tuple[torch.Tensor, torch.Tensor]]] = None  # per layer (keys, values)
    prefix_width: int = 0
    # With the layers below the edit cached: the output of layer z_layer for every row and token.
    below: Optional[torch.Tensor] = None

    def select(self, keep: torch.Tensor) -> "_Batch":
        """The rows of the requests where ``keep`` (bool per request) is set, padding trimmed."""
        keep = keep.to(self.row_request.device)
        rows = keep[self.row_request].nonzero()[:, 0]
        new_row = torch.full_like(self.row_request, -1)
        new_row[rows] = torch.arange(len(rows), device=rows.device)
        tokens = keep[self.token_request]
        kls = keep[self.kl_request]
        mask = self.attention_mask[rows]
        width = int(mask[:, self.prefix_width:].sum(1).max())
        prefix = None
        if self.prefix is not None:
            prefix = [(k[rows.to(k.device)], v[rows.to(v.device)]) for k, v in self.prefix]
        return replace(
            self, input_ids=self.input_ids[rows, :width], attention_mask=mask[:, : self.prefix_width + width],
            position_ids=self.position_ids[rows, :width] if self.position_ids is not None else None, prefix=prefix,
            below=self.below[rows.to(self.below.device), :width] if self.below is not None else None,
            fact_positions=self.fact_positions[rows], row_request=self.row_request[rows],
            first_rows=new_row[self.first_rows],
            token_rows=new_row[self.token_rows[tokens]], token_positions=self.token_positions[tokens],
            token_ids=self.token_ids[tokens], token_weights=self.token_weights[tokens],
            token_request=self.token_request[tokens],
            kl_rows=new_row[self.kl_rows[kls]], kl_positions=self.kl_positions[kls], kl_request=self.kl_request[kls],
        )


def _build_batch(tok, requests, templates: Sequence[str], fact_token: str, device) -> _Batch:
    sequences, fact_positions, row_request, first_rows = [], [], [], []
    token_rows, token_positions, token_ids, token_weights, token_request = [], [], [], [], []
    kl_rows, kl_positions = [], []
    for j, request in enumerate(requests):
        target = target_ids(tok, request["target_new"]["str"])
        first_rows.append(len(sequences))
        for template in expand_templates(templates, request["prompt"]):
            prompt = prompt_ids(tok, template.format(request["subject"]))
            row = len(sequences)
            sequences.append(prompt + target[:-1])
            fact_positions.append(fact_token_index(tok, template, request["subject"], fact_token))
            row_request.append(j)
            for offset, token in enumerate(target):
                token_rows.append(row)
                token_positions.append(len(prompt) - 1 + offset)
                token_ids.append(token)
                token_weights.append(1.0 / (len(target) * len(templates)))
                token_request.append(j)
        kl_rows.append(len(sequences))
        sequences.append(prompt_ids(tok, KL_PROMPT.format(request["subject"])))
        kl_index = fact_token_index(tok, KL_PROMPT, request["subject"], fact_token)
        fact_positions.append(kl_index)
        kl_positions.append(kl_index)
        row_request.append(j)
    ids, mask = pad_batch(tok, sequences, device=device, side="right")
    as_long = lambda values: torch.tensor(values, dtype=torch.long, device=device)
    return _Batch(
        input_ids=ids, attention_mask=mask, fact_positions=as_long(fact_positions),
        row_request=as_long(row_request), first_rows=as_long(first_rows),
        token_rows=as_long(token_rows), token_positions=as_long(token_positions), token_ids=as_long(token_ids),
        token_weights=torch.tensor(token_weights, device=device), token_request=as_long(token_request),
        kl_rows=as_long(kl_rows), kl_positions=as_long(kl_positions), kl_request=as_long(range(len(requests))),
    )


@torch.no_grad()
def _with_prefix_cache(model, tok, batch: _Batch, shared: Optional[SharedPrefixes] = None) -> _Batch:
    """Run every row's tokens before its fact token once and keep their keys and values; the batch then
    holds only the tokens from the fact token on. A row that begins with one of the ``shared`` contexts
    takes that context's keys and values and runs only the tokens after it. Unchanged when a fact token
    is a row's first token."""
    prefix_len = batch.fact_positions
    if int(prefix_len.min()) < 1:
        return batch
    device = prefix_len.device
    lengths = batch.attention_mask.sum(1)
    rest = int((lengths - prefix_len).max())
    pad = batch.input_ids.new_full((), pad_token_id(tok))
    positions = prefix_len[:, None] + torch.arange(rest, device=device)[None]
    suffix_mask = (positions < lengths[:, None]).long()
    gathered = batch.input_ids.gather(1, positions.clamp(max=batch.input_ids.shape[1] - 1))
    suffix_ids = torch.where(suffix_mask.bool(), gathered, pad)
    rows = [row[:p] for row, p in zip(batch.input_ids.tolist(), prefix_len.tolist())]
    # The decoder alone: only the keys and values are needed, not the output head.
    decoder = model.get_decoder()
    if shared is None:
        prefix_ids, prefix_mask = pad_batch(tok, rows, device=device)
        prefix = model_cache(decoder(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True))
    else:
        cut = after_prefixes(tok, rows, shared, device)
        prefix_mask = torch.cat([cut.past_mask.to(device), cut.own_mask], 1)
        if cut.input_ids.shape[1] == 0:  # every prefix is a shared context
            prefix = cut.past
        else:
            prefix = model_cache(decoder(**cut.forward_kwargs(decoder)))
    return replace(
        batch, input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask, suffix_mask], 1), position_ids=positions,
        prefix=prefix, prefix_width=prefix_mask.shape[1],
        fact_positions=torch.zeros_like(prefix_len),
        token_positions=batch.token_positions - prefix_len[batch.token_rows],
        kl_positions=batch.kl_positions - prefix_len[batch.kl_rows],
    )


@torch.no_grad()
def _with_output_below(model, batch: _Batch, layer_name: str) -> _Batch:
    """Run the rows up to ``layer_name`` once and keep its output: no optimisation step changes it."""
    with Trace(model, layer_name, retain_output=True, stop=True) as trace:
        model(**_forward_kwargs(model, batch))
    return replace(batch, below=trace.output)


def _forward_kwargs(model, batch: _Batch) -> dict:
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **hidden_states_only_kwargs(model))
    if batch.prefix is not None:
        kwargs.update(position_ids=batch.position_ids, **cache_kwargs(model, batch.prefix))
    return kwargs


def kl_to_unedited(log_probs: torch.Tensor, unedited_log_probs: torch.Tensor) -> torch.Tensor:
    """``KL(p || p_0)`` per row: the edited distribution against the unedited one (MEMIT's direction)."""
    return (log_probs.exp() * (log_probs - unedited_log_probs)).sum(-1)


def _target_most_probable(token_log_probs: torch.Tensor, batch: _Batch, n: int) -> torch.Tensor:
    """Per request: is each of its target tokens the argmax on each of its prompts (bool ``[n]``)?
    Requests without rows in ``batch`` (already stopped) come out true."""
    missed = (token_log_probs.argmax(-1) != batch.token_ids.to(token_log_probs.device)).float()
    misses = torch.zeros(n, device=missed.device).index_add(0, batch.token_request.to(missed.device), missed)
    return misses == 0


def step_widths(tok, requests, fact_token: str) -> List[int]:
    """Tokens each request's prompt rows run at every optimisation step: from the fact token to the end of
    the prompt and target (with the prefix cache the tokens before it are not rerun). The context
    templates only add tokens before the subject, so every template row of a request has this width."""
    return [len(prompt_ids(tok, r["prompt"].format(r["subject"]))) + len(target_ids(tok, r["target_new"]["str"]))
            - 1 - fact_token_index(tok, r["prompt"], r["subject"], fact_token) for r in requests]


def chunks_by_width(members: Sequence[int], widths: Optional[Sequence[int]], size: Optional[int]) -> List[List[int]]:
    """``members`` in loops of at most ``size`` (``None``: one loop), ordered by width (stable), so that the
    rows of one loop are alike in length and carry little padding: on the first 100 CounterFact requests in
    loops of 10, 35% of the token slots of a step are padding in consecutive chunks and 12% in chunks by
    width. Requests with their own deltas never interact, so which ones share a loop changes their values
    only by float rounding. ``widths=None`` (shared deltas, whose plan decides their values) keeps the
    given order, as do members that fit one loop."""
    members = list(members)
    if size is None or len(members) <= size:
        return [members] if members else []
    return list(chunks(members if widths is None else sorted(members, key=lambda i: widths[i]), size))


def compute_target_values(
    model, tok, requests, hparams, template_groups, z_layer: int, requests_per_loop: Optional[int] = None,
    loops: Optional[Sequence[Sequence[int]]] = None, shared_delta: bool = False, prefix_cache: bool = True,
    edit_module: Optional[str] = None,
) -> TargetValues:
    """Optimise the target value of every request.

    Which requests share one loop: ``loops`` (lists of request indices, e.g. ECE's clusters), else
    chunks of ``requests_per_loop`` (``None``: all of them; ``1``: one loop per request, MEMIT's original
    schedule), alike in width (``chunks_by_width``; consecutive with a shared delta). Results are in the
    order of ``requests``. ``prefix_cache=False`` recomputes every token at every step (the published
    implementation's cost; same values).
    ``edit_module``: the module of layer ``z_layer`` whose output gets the delta (ROME: the MLP, as
    rome/compute_v.py:79-87 hooks ``mlp_module_tmp``); default the decoder layer itself (MEMIT).
    """
    requests = list(requests)
    if loops is None:
        widths = None if shared_delta else step_widths(tok, requests, hparams.fact_token)
        loops = chunks_by_width(range(len(requests)), widths, requests_per_loop)
    order = [i for loop in loops for i in loop]
    if sorted(order) != list(range(len(requests))):
        raise ValueError(f"loops must cover each of the {len(requests)} requests exactly once, got {loops}")
    templates = [t for group in template_groups for t in group]
    low_dtype = products_dtype(hparams.z_dtype, model)
    if low_dtype is not None:
        LOG.info("target loops: products above the edit in %s (z_dtype: %s)", str(low_dtype).replace("torch.", ""),
                 hparams.z_dtype)
    # The context templates' own tokens, once for every loop (the prefix pass then runs only the rest).
    contexts = shared_prefixes(model, tok, context_texts(templates), model_device(model)) if prefix_cache else None
    run_loop = lambda on_model, loop: _optimise(
        on_model, tok, [requests[i] for i in loop], hparams, templates, z_layer, shared_delta, prefix_cache,
        edit_module, contexts if on_model is model or contexts is None else contexts.to(model_device(on_model)))
    devices = loop_devices(model, hparams.z_devices or [])
    if len(devices) > 1:
        loops = split_for_devices(loops, len(devices), splittable=not shared_delta)
        order = [i for loop in loops for i in loop]
        parts = _on_devices(model, devices, loops, run_loop)
    else:
        parts = [run_loop(model, loop) for loop in loops]
    position = torch.argsort(torch.tensor(order))  # back to request order
    loop_index = {i: k for k, loop in enumerate(loops) for i in loop}
    stacked = lambda name: torch.cat([getattr(p, name) for p in parts])[position.to(parts[0].targets.device)]
    flat = lambda name: [x for p in parts for x in getattr(p, name)]
    return TargetValues(
        targets=stacked("targets"), initial=stacked("initial"),
        steps=[flat("steps")[i] for i in position.tolist()], losses=[flat("losses")[i] for i in position.tolist()],
        loops=len(parts), loop_of=[loop_index[i] for i in range(len(requests))],
        forward_rows=sum(p.forward_rows for p in parts), forward_tokens=sum(p.forward_tokens for p in parts),
    )


def _optimise(model, tok, requests, hparams, templates, z_layer: int, shared_delta: bool = False,
              prefix_cache: bool = True, edit_module: Optional[str] = None,
              contexts: Optional[SharedPrefixes] = None) -> TargetValues:
    edit_module = edit_module or hparams.layer_module(z_layer)
    z_module = get_module(model, edit_module)
    loss_module_name = hparams.layer_module(hparams.v_loss_layer)
    ln_f = get_module(model, hparams.ln_f_module)
    unembed = model.get_output_embeddings()
    head_device = unembed.weight.device
    # With z_dtype, the layers above the edit (those the delta reaches) compute their products in that dtype,
    # the prefix pass included, and so does the output head (weights cast once per loop). The unedited
    # output at the edit, from the layers below, keeps the model's precision.
    compute_dtype = products_dtype(hparams.z_dtype, model)
    low_precision_names = []
    if compute_dtype is not None:
        low_precision_names = [hparams.layer_module(i) for i in range(z_layer + 1, hparams.v_loss_layer + 1)]
        low_precision_names.append(next(name for name, module in model.named_modules() if module is unembed))
    low_precision = lambda: (low_precision_products(model, low_precision_names, compute_dtype)
                             if compute_dtype is not None else nullcontext())
    batch = _build_batch(tok, requests, templates, hparams.fact_token, model_device(model))
    if prefix_cache:
        with low_precision():
            batch = _with_prefix_cache(model, tok, batch, contexts)
    # Nothing up to the edited module depends on the delta: the decoder layers up to z_layer when the
    # delta goes on that layer's output, up to the one before when it goes inside the layer.
    top_unchanged = z_layer if edit_module == hparams.layer_module(z_layer) else z_layer - 1
    layers_below = [hparams.layer_module(i) for i in range(top_unchanged + 1)]
    if hparams.z_below_cache and layers_below:
        batch = _with_output_below(model, batch, layers_below[-1])
    n = len(requests)
    delta_device = next(z_module.parameters()).device
    delta_of = torch.zeros(n, dtype=torch.long, device=delta_device) if shared_delta else torch.arange(n, device=delta_device)
    delta = torch.zeros((1 if shared_delta else n, model.config.hidden_size), device=delta_device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    initial: Optional[torch.Tensor] = None
    initial_kl: Optional[torch.Tensor] = None  # [n, vocab], by request
    active = torch.ones(n, dtype=torch.bool, device=delta_device)
    steps = torch.zeros(n, dtype=torch.long)
    last_loss = torch.zeros(n)
    steps_on_top = torch.zeros(n, dtype=torch.long, device=delta_device)  # steps with the target most probable
    forward_rows = forward_tokens = 0

    def add_delta(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal initial
        positions = batch.fact_positions.to(hidden.device)
        if initial is None:
            first = batch.first_rows.to(hidden.device)
            initial = hidden[first, positions[first]].detach().float()
        addition = delta[delta_of[batch.row_request.to(delta_device)]].to(hidden.device, hidden.dtype)
        rows = torch.arange(len(positions), device=hidden.device)
        return hidden.index_put((rows, positions), addition, accumulate=True)

    def log_probs_at(hidden: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        selected = hidden[rows.to(hidden.device), positions.to(hidden.device)]
        selected = selected.to(ln_f.weight.device if hasattr(ln_f, "weight") else selected.device)
        logits = unembed(ln_f(selected).to(head_device))
        return torch.log_softmax(logits.float(), dim=-1)

    # The layers every step runs (above the cached ones), as compiled code with z_compile.
    first_run = len(layers_below) if batch.below is not None else 0
    layers_run = [hparams.layer_module(i) for i in range(first_run, hparams.v_loss_layer + 1)]
    with ExitStack() as compiled:
        compiled.enter_context(low_precision())
        if hparams.z_compile:
            compiled.enter_context(compiled_modules(model, layers_run))
        for step in range(hparams.v_num_grad_steps):
            with ExitStack() as stack:
                if batch.below is not None:
                    stack.enter_context(skip_modules(model, layers_below, lambda: batch.below))
                stack.enter_context(Trace(model, edit_module, retain_output=False, edit_output=add_delta))
                loss_trace = stack.enter_context(
                    Trace(model, loss_module_name, retain_output=True, detach=False, stop=True)
                )
                model(**_forward_kwargs(model, batch))
            forward_rows += len(batch.input_ids)
            forward_tokens += int(batch.attention_mask[:, batch.prefix_width:].sum())
            hidden = loss_trace.output
            token_log_probs = log_probs_at(hidden, batch.token_rows, batch.token_positions)
            token_nll = -token_log_probs.gather(1, batch.token_ids.to(head_device)[:, None])[:, 0]
            nll = torch.zeros(n, device=head_device).index_add(
                0, batch.token_request.to(head_device), token_nll * batch.token_weights.to(head_device)
            )
            kl_log_probs = log_probs_at(hidden, batch.kl_rows, batch.kl_positions)
            if initial_kl is None:
                initial_kl = kl_log_probs.detach()
            reference = initial_kl[batch.kl_request.to(head_device)]
            kl = torch.zeros(n, device=head_device).index_add(
                0, batch.kl_request.to(head_device), kl_to_unedited(kl_log_probs, reference)
            )
            init_norm = initial.to(delta_device).norm(dim=1)
            weight_decay = hparams.v_weight_decay * (delta[delta_of].norm(dim=1) / init_norm**2)
            loss = nll.to(delta_device) + hparams.kl_factor * kl.to(delta_device) + weight_decay
            with torch.no_grad():
                last_loss[active.cpu()] = loss.detach().float().cpu()[active.cpu()]
                active &= loss >= hparams.v_stop_loss
                if hparams.v_stop_most_probable_steps is not None:
                    steps_on_top += active & _target_most_probable(token_log_probs, batch, n).to(delta_device)
                    active &= steps_on_top < hparams.v_stop_most_probable_steps
                if hparams.v_stop_nll is not None:
                    active &= nll.to(delta_device) >= hparams.v_stop_nll
            LOG.debug("step %d: loss %s, %d of %d requests still optimising", step,
                      [round(x, 3) for x in loss.detach().tolist()], int(active.sum()), n)
            if not bool(active.any()) or step == hparams.v_num_grad_steps - 1:
                break
            optimizer.zero_grad()
            total = (loss * active).sum()
            (total / active.sum() if shared_delta else total).backward()
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                if not shared_delta:
                    delta[~active] = before[~active]
                smallest_init_norm = torch.full((len(delta),), float("inf"), device=delta_device).scatter_reduce(
                    0, delta_of, init_norm, reduce="amin")
                max_norm = hparams.clamp_norm_factor * smallest_init_norm
                norms = delta.norm(dim=1)
                scale = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
                delta.mul_(scale[:, None])
            steps[active.cpu()] += 1
            if int(active.sum()) < len(batch.kl_request):
                batch = batch.select(active)
    LOG.debug("target values: %d requests, steps %s, losses %s", n, steps.tolist(), last_loss.tolist())
    targets = (initial.to(delta_device) + delta.detach()[delta_of]).float()
    return TargetValues(targets=targets, initial=initial.to(delta_device), steps=steps.tolist(),
                        losses=last_loss.tolist(), loops=1, loop_of=[0] * n, forward_rows=forward_rows,
                        forward_tokens=forward_tokens)


def _on_devices(model, devices, loops, run_loop) -> List[TargetValues]:
    """Run ``loops`` spread over ``devices`` (one thread and one model copy each); results in loop order,
    on the model's device."""
    from concurrent.futures import ThreadPoolExecutor

    models = replicas_for(model, devices)
    shares = assign_loops(loops, len(devices))
    home = model_device(model)

    def run_share(d: int) -> List[Tuple[int, TargetValues]]:
        with torch.cuda.device(devices[d]) if devices[d].type == "cuda" else nullcontext():
            return [(k, run_loop(models[d], loops[k])) for k in shares[d]]

    LOG.info("target loops on %s: %s loops each", [str(d) for d in devices], [len(share) for share in shares])
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        done = dict(pair for share in pool.map(run_share, range(len(devices))) for pair in share)
    parts = []
    for k in range(len(loops)):
        part = done[k]
        parts.append(replace(part, targets=part.targets.to(home), initial=part.initial.to(home)))
    return parts
