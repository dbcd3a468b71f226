"""Batched text generation with left padding and a full attention mask.

The upstream context-template generator produced garbage (``'The-, the the--,, a. {}'``) because it
passed only a slice of the attention mask with left-padded prompts; here the whole mask goes to
``generate`` together with the padded ids, so every row sees only its own tokens.

``sample_top_k_texts`` is the generation protocol of MEMIT's fluency and consistency metrics (top-k 5
sampling, 100 tokens including the prompt), seeded per prompt so that reruns give the same texts.
``score_and_answer`` runs each evaluation prompt once: the teacher-forced scores of its targets continue from
its cached keys and values, and the short argmax answer of the free-generation metric
(``experiments/free_generation.py``) decodes from them with the same cached loop.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import unicodedata
from typing import List, Optional, Sequence, Tuple

import torch

from util.models import model_device
from util.scoring import ContinuationScore
from util.tokens import chunks, even_chunks, pad_batch, pad_token_id, prompt_ids, target_ids


@torch.no_grad()
def generate_texts(
    model,
    tok,
    prompts: Sequence[str],
    max_new_tokens: int,
    do_sample: bool = False,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    batch_size: int = 16,
) -> List[str]:
    """Prompt + continuation for each prompt; greedy unless ``do_sample``."""
    if seed is not None:
        torch.manual_seed(seed)
    device = model_device(model)
    outputs: List[str] = []
    for batch in chunks(list(prompts), batch_size):
        encoded = [prompt_ids(tok, p) for p in batch]
        ids, mask = pad_batch(tok, encoded, device=device, side="left")
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad_token_id(tok))
        if do_sample:
            kwargs.update(top_k=top_k, top_p=1.0, temperature=1.0)
        else:
            kwargs.update(top_k=None, top_p=None, temperature=None)
        generated = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new_tokens = generated[:, ids.shape[1]:]
        for prompt, row in zip(batch, new_tokens):
            outputs.append(prompt + tok.decode(row, skip_special_tokens=True))
    return outputs


def generation_seed(run_seed: int, case_id, prompt_index: int) -> int:
    """A 63-bit seed for one generation prompt of one case, the same in every process and on every rerun
    (Python's ``hash`` of a string changes between processes, so it is not used)."""
    digest = hashlib.sha256(f"{run_seed}:{case_id}:{prompt_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def normalise_generated_text(text: str) -> str:
    """MEMIT's post-processing of generated texts (util/generate.py generate_fast, lines 150-155 of
    kmeng01/memit): NFKD normalisation and blank lines folded into one space."""
    return unicodedata.normalize("NFKD", text).replace("\n\n", " ")


@torch.no_grad()
def sample_top_k_ids(
    model,
    tok,
    prompts: Sequence[str],
    seeds: Sequence[int],
    max_out_len: int = 100,
    top_k: int = 5,
    batch_size: int = 16,
) -> List[List[int]]:
    """Prompt ids followed by top-k sampled ids, ``max_out_len`` tokens per prompt in all.

    This is MEMIT's ``generate_fast`` protocol (kmeng01/memit util/generate.py lines 77-157): softmax over the
    vocabulary, the ``top_k`` most likely tokens renormalised, one token drawn per step, no stop at the
    end-of-text token. Each prompt draws from its own CPU ``torch.Generator`` seeded with ``seeds[i]``, so a
    sequence depends on its seed and prompt only, not on the batch it ran in or on the global random state
    (which ``generate_fast`` used).
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    device = model_device(model)
    sequences: List[List[int]] = []
    for start in range(0, len(prompts), batch_size):
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        encoded = [prompt_ids(tok, p) for p in prompts[start : start + batch_size]]
        new_tokens = _sample_batch(model, tok, encoded, generators, max_out_len, top_k, device)
        sequences += [ids + new for ids, new in zip(encoded, new_tokens)]
    return sequences


def sample_top_k_texts(model, tok, prompts: Sequence[str], seeds: Sequence[int], max_out_len: int = 100,
                       top_k: int = 5, batch_size: int = 16) -> List[str]:
    """``sample_top_k_ids`` decoded as MEMIT did: the whole sequence, special tokens dropped, normalised."""
    sequences = sample_top_k_ids(model, tok, prompts, seeds, max_out_len, top_k, batch_size)
    return [normalise_generated_text(tok.decode(ids, skip_special_tokens=True)) for ids in sequences]


def _forward_kwargs(model) -> dict:
    """The name of the key/value cache argument (``cache`` in transformers 5, ``past_key_values`` before)
    and ``logits_to_keep=1`` where supported, since only the last position's logits are used."""
    parameters = inspect.signature(model.forward).parameters
    names = {"cache": "cache" if "cache" in parameters else "past_key_values"}
    if "logits_to_keep" in parameters:
        names["logits_to_keep"] = 1
    return names


def _sample_batch(model, tok, encoded, generators, max_out_len: int, top_k: int, device) -> List[List[int]]:
    """New token ids per row: each row draws from its own top-k distribution until its budget is spent."""
    budgets = [max(0, max_out_len - len(ids)) for ids in encoded]

    def choose(logits: torch.Tensor, active: List[int]) -> dict:
        probs = torch.softmax(logits.float(), dim=-1)
        top = torch.topk(probs, top_k, dim=-1)
        top_probs, top_ids = top.values.cpu(), top.indices.cpu()
        picked = {}
        for row in active:
            choice = torch.multinomial(top_probs[row] / top_probs[row].sum(), 1, generator=generators[row])
            picked[row] = int(top_ids[row, choice.item()])
        return picked

    return _decode_batch(model, tok, encoded, budgets, choose, device)


def _cache_of(out):
    return out.get("cache", None) or out.get("past_key_values", None)


def _prefill(model, tok, encoded, device, options: dict):
    """One cached forward of left-padded prompts: ``(last logits, cache, mask, positions)``."""
    ids, mask = pad_batch(tok, encoded, device=device, side="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **options)
    return out.logits[:, -1, :], _cache_of(out), mask, positions


def _decode_batch(model, tok, encoded, budgets, choose, device) -> List[List[int]]:
    """New token ids per row: left-padded prompts, explicit positions, one cached forward per step."""
    if max(budgets, default=0) == 0:
        return [[] for _ in encoded]
    options = _forward_kwargs(model)
    cache_name = options.pop("cache")
    logits, cache, mask, positions = _prefill(model, tok, encoded, device, options)
    return _decode_from(model, tok, logits, cache, mask, positions, budgets, choose, cache_name, options)


def _decode_from(model, tok, logits, cache, mask, positions, budgets, choose, cache_name: str,
                 options: dict) -> List[List[int]]:
    """``_decode_batch`` after the prompts' forward pass (``logits``: their last positions').

    ``choose(last_logits, active_rows)`` returns ``{row: next id}`` for the rows whose budget is not spent;
    the other rows are fed padding, which no later token of theirs reads."""
    new_tokens: List[List[int]] = [[] for _ in budgets]
    steps = max(budgets, default=0)
    pad = pad_token_id(tok)
    reserve_room(cache, steps)
    for step in range(steps):
        active = [row for row, budget in enumerate(budgets) if step < budget]
        picked = choose(logits, active)
        next_ids = torch.full((len(budgets),), pad, dtype=torch.long)
        for row, token in picked.items():
            next_ids[row] = token
            new_tokens[row].append(token)
        if step == steps - 1:
            break
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None].to(mask.device), attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_name: cache}, **options)
        logits, cache = out.logits[:, -1, :], _cache_of(out)
    return new_tokens


def reserve_room(cache, tokens: int) -> None:
    """Give every plain layer of a ``DynamicCache`` room for ``tokens`` more positions (``roomy_layer_class``);
    other caches are left as they are."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    if not isinstance(cache, DynamicCache) or tokens <= 0:
        return
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys.dim() == 4:
            cache.layers[index] = roomy_layer_class()(layer.keys, layer.values, tokens)


@functools.lru_cache(maxsize=None)
def roomy_layer_class():
    """The cache layer class below, defined on first use so that importing this module imports no transformers."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A cache layer whose keys and values sit at the front of buffers with room for more positions, so that
        a decoding step writes its position in place. ``DynamicLayer`` concatenates the whole cache with the new
        position at every step, which made sampling 100-token texts in batches of 256 12% slower on a 2-core CPU.
        ``keys`` and ``values`` are views of the filled part, as ``crop`` and the attention read them. The
        decoding loops here neither reorder nor select rows, so the inherited methods that replace ``keys`` (beam
        search's) are not adapted to the buffers."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
            super().__init__()
            self.device, self.is_initialized, self.length = keys.device, True, 0
            self._buffers = tuple(t.new_empty(*t.shape[:-2], 0, t.shape[-1]) for t in (keys, values))
            self.update(keys, values, room=room)

        def update(self, key_states, value_states, *args, room: int = 0, **kwargs):
            end = self.length + key_states.shape[-2]
            if end > self._buffers[0].shape[-2]:  # out of room: move to buffers with ``room`` more, or twice
                capacity = end + room if room else 2 * end
                self._buffers = tuple(
                    torch.cat([buffer[..., : self.length, :],
                               states.new_empty(*states.shape[:-2], capacity - self.length, states.shape[-1])], dim=-2)
                    for buffer, states in zip(self._buffers, (key_states, value_states)))
            self._buffers[0][..., self.length : end, :] = key_states
            self._buffers[1][..., self.length : end, :] = value_states
            self.length = end
            self.keys, self.values = (buffer[..., :end, :] for buffer in self._buffers)
            return self.keys, self.values

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError(f"crop takes a negative count of positions to remove, got {tokens_to_remove}")
            self.length -= min(abs(tokens_to_remove), self.length)
            self.keys, self.values = (buffer[..., : self.length, :] for buffer in self._buffers)

    return RoomyLayer


def _argmax_choice(logits: torch.Tensor, active: List[int]) -> dict:
    best = logits.argmax(dim=-1).cpu()
    return {row: int(best[row]) for row in active}


def _score_from_prompts(model, tok, last_logits, cache, mask, positions, wanted: Sequence[Sequence[List[int]]],
                        cache_name: str, options: dict):
    """Teacher-forced scores of each row's targets (token ids) after its prompt, whose forward pass gave
    ``last_logits`` and ``cache``, and the cache again holding the prompts alone. Target ``j`` of every row is
    fed in one forward from the prompts' cache, which is then cut back to the prompts, so that target ``j + 1``
    sees the prompt alone."""
    pad = pad_token_id(tok)
    scores: List[List[ContinuationScore]] = [[] for _ in wanted]
    for j in range(max((len(t) for t in wanted), default=0)):
        column = [targets[j] if j < len(targets) else None for targets in wanted]
        fed = [target[:-1] if target else [] for target in column]  # the last token is predicted, never fed
        span = max(map(len, fed))
        following = None
        if span:
            ids = torch.full((len(fed), span), pad, dtype=torch.long)
            for row, tokens in enumerate(fed):
                ids[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
            # Padding after a row's own tokens: causal attention keeps it from the row's predictions.
            fed_mask = torch.cat([mask, mask.new_ones(mask.shape[0], span)], dim=1)
            fed_positions = positions[:, -1:] + 1 + torch.arange(span, device=mask.device)
            keep = {"logits_to_keep": span} if "logits_to_keep" in options else {}
            out = model(input_ids=ids.to(mask.device), attention_mask=fed_mask, position_ids=fed_positions,
                        use_cache=True, **keep, **{cache_name: cache})
            following, cache = out.logits[:, -span:], _cache_of(out)
            cache.crop(-span)  # back to the prompts (a negative count removes that many positions)
        for row, target in enumerate(column):
            if target is None:
                continue
            steps = last_logits[row : row + 1]
            if len(target) > 1:
                steps = torch.cat([steps, following[row, : len(target) - 1]])
            log_probs = torch.log_softmax(steps.float(), dim=-1)
            expected = torch.as_tensor(target, device=log_probs.device)
            picked = log_probs.gather(1, expected[:, None])[:, 0]
            scores[row].append(ContinuationScore((-picked).tolist(), (log_probs.argmax(-1) == expected).tolist()))
    return scores, cache


def _joined(parts: Sequence[tuple], model):
    """One decoding batch from several prefilled ones (``(logits, cache, mask, positions)`` each): the caches and
    masks padded on the left to the widest, which the mask hides. ``None`` for a cache that is not a
    ``DynamicCache`` (the parts then decode one by one)."""
    from transformers import DynamicCache

    if len(parts) == 1:
        return parts[0]
    if not all(isinstance(cache, DynamicCache) for _, cache, _, _ in parts):
        return None
    width = max(mask.shape[1] for _, _, mask, _ in parts)
    widen = lambda t, dim: torch.nn.functional.pad(t, (0, 0) * (t.dim() - 1 - dim) + (width - t.shape[dim], 0))
    layers = [(torch.cat([widen(cache.layers[i].keys, 2) for _, cache, _, _ in parts]),
               torch.cat([widen(cache.layers[i].values, 2) for _, cache, _, _ in parts]))
              for i in range(len(parts[0][1].layers))]
    return (torch.cat([logits for logits, _, _, _ in parts]),
            DynamicCache(ddp_cache_data=layers, config=model.config),
            torch.cat([widen(mask, 1) for _, _, mask, _ in parts]),
            torch.cat([positions[:, -1:] for _, _, _, positions in parts]))


@torch.no_grad()
def score_and_answer(model, tok, prompts: Sequence[str], targets: Sequence[Sequence[str]],
                     max_new_tokens: Sequence[int], batch_size: int = 64, decode_batches: int = 4
                     ) -> List[Tuple[List[ContinuationScore], List[int]]]:
    """For each prompt, the teacher-forced scores of its ``targets`` (as ``util.scoring.continuation_scores``:
    leading space, per-token NLL and top-1) and its greedy (argmax) continuation of ``max_new_tokens`` tokens,
    no stop at the end-of-text token (callers cut where they need to), all from one cached forward pass of the
    prompt.

    An evaluation that scores two targets after a prompt and decodes its answer would otherwise run the prompt
    three times; here its keys and values are computed once, each target's tokens continue from them and the
    answer decodes from them. Prompts run ``batch_size`` at a time; the answers of ``decode_batches`` such
    batches decode together, since one decoding step of a few rows costs nearly as much as one of hundreds
    (every weight is read for one token per row). Values equal separate passes up to float rounding."""
    if not len(prompts) == len(targets) == len(max_new_tokens):
        raise ValueError(f"{len(prompts)} prompts, {len(targets)} target lists, {len(max_new_tokens)} token budgets")
    device = model_device(model)
    encoded = [prompt_ids(tok, p) for p in prompts]
    wanted = [[target_ids(tok, t) for t in row] for row in targets]
    budgets = [max(0, int(n)) for n in max_new_tokens]
    options = _forward_kwargs(model)
    cache_name = options.pop("cache")
    results: List[Optional[tuple]] = [None] * len(prompts)
    # Prompts whose targets are all one token need no forward beyond their own, so they are batched apart from
    # the others; then similar prompt lengths and budgets: little padding, few steps past a row's budget.
    order = sorted(range(len(prompts)),
                   key=lambda i: (max(map(len, wanted[i]), default=1) > 1, len(encoded[i]), budgets[i]))
    for group in even_chunks(order, batch_size * decode_batches):
        parts = []
        for batch in even_chunks(group, batch_size):
            logits, cache, mask, positions = _prefill(model, tok, [encoded[i] for i in batch], device, options)
            scores, cache = _score_from_prompts(model, tok, logits, cache, mask, positions,
                                                [wanted[i] for i in batch], cache_name, options)
            for i, row_scores in zip(batch, scores):
                results[i] = (row_scores, [])
            if any(budgets[i] for i in batch):
                parts.append((batch, (logits, cache, mask, positions)))
        joined = _joined([state for _, state in parts], model) if parts else None
        runs = [([i for batch, _ in parts for i in batch], joined)] if joined is not None else parts
        for rows, state in runs:
            for i, answer in zip(rows, _decode_from(model, tok, *state, [budgets[i] for i in rows], _argmax_choice,
                                                    cache_name, options)):
                results[i] = (results[i][0], answer)
    return results
