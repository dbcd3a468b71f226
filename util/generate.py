"""Batched text generation with left padding and a full attention mask.

The upstream context-template generator produced garbage (``'The-, the the--,, a. {}'``) because it
passed only a slice of the attention mask with left-padded prompts; here the whole mask goes to
``generate`` together with the padded ids, so every row sees only its own tokens.

``sample_top_k_texts`` is the generation protocol of MEMIT's fluency and consistency metrics (top-k 5
sampling, 100 tokens including the prompt), seeded per prompt so that reruns give the same texts.
``greedy_continuation_ids`` decodes the short argmax answers of the free-generation metric
(``experiments/free_generation.py``) with the same cached loop.
"""
from __future__ import annotations

import hashlib
import inspect
import unicodedata
from typing import List, Optional, Sequence

import torch

from util.models import model_device
from util.tokens import chunks, pad_batch, pad_token_id, prompt_ids


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


@torch.no_grad()
def greedy_continuation_ids(model, tok, prompts: Sequence[str], max_new_tokens: Sequence[int],
                            batch_size: int = 32) -> List[List[int]]:
    """Exactly ``max_new_tokens[i]`` argmax tokens after prompt ``i`` (no stop at the end-of-text token:
    callers cut where they need to), batched with left padding and the key/value cache."""
    if len(max_new_tokens) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(max_new_tokens)} token budgets")
    device = model_device(model)
    encoded = [prompt_ids(tok, p) for p in prompts]
    budgets = [max(0, int(n)) for n in max_new_tokens]
    out: List[List[int]] = [[] for _ in prompts]

    def choose(logits: torch.Tensor, active: List[int]) -> dict:
        best = logits.argmax(dim=-1).cpu()
        return {row: int(best[row]) for row in active}

    # Batches of similar prompt lengths and budgets: little padding, few steps past a row's budget.
    order = sorted(range(len(prompts)), key=lambda i: (len(encoded[i]), budgets[i]))
    for batch in chunks(order, batch_size):
        for i, ids in zip(batch, _decode_batch(model, tok, [encoded[i] for i in batch], [budgets[i] for i in batch],
                                               choose, device)):
            out[i] = ids
    return out


def _decode_batch(model, tok, encoded, budgets, choose, device) -> List[List[int]]:
    """New token ids per row: left-padded prompts, explicit positions, one cached forward per step.

    ``choose(last_logits, active_rows)`` returns ``{row: next id}`` for the rows whose budget is not spent;
    the other rows are fed padding, which no later token of theirs reads."""
    new_tokens: List[List[int]] = [[] for _ in encoded]
    steps = max(budgets, default=0)
    if steps == 0:
        return new_tokens
    options = _forward_kwargs(model)
    cache_name = options.pop("cache")
    ids, mask = pad_batch(tok, encoded, device=device, side="left")
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **options)
    pad = pad_token_id(tok)
    for step in range(steps):
        active = [row for row, budget in enumerate(budgets) if step < budget]
        picked = choose(out.logits[:, -1, :], active)
        next_ids = torch.full((len(encoded),), pad, dtype=torch.long)
        for row, token in picked.items():
            next_ids[row] = token
            new_tokens[row].append(token)
        if step == steps - 1:
            break
        cache = out.get("cache", None) or out.get("past_key_values", None)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=next_ids[:, None].to(device), attention_mask=mask, position_ids=positions,
                    use_cache=True, **{cache_name: cache}, **options)
    return new_tokens
