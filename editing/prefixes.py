"""The context templates' own tokens, computed once and shared by every row written in that context.

MEMIT-style editing writes each request's prompt after a few generated contexts ("The first two rows of
the matrix are identical. {}"): five of a request's six template rows begin with ten or so tokens that
are the same for every request. In a causal model those tokens' keys and values do not depend on what
follows, so one forward pass over the distinct contexts gives them for every row; each row then runs only
its own tokens, with the context's keys and values as its past. The keys pass of the layer loop and the
prefix pass of every target loop do this: about a third of their tokens, the same values up to float
rounding.

A row shares a context only when its token ids begin with the context's token ids (BPE tokenisers attach
the space before the prompt to the prompt's first word, so the context is tokenised without it); any
other row runs all of its tokens itself.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from util.tokens import pad_batch, prompt_ids


def context_texts(templates: Sequence[str]) -> List[str]:
    """The distinct texts the templates put before ``{}`` (trailing space dropped); none for a bare ``{}``."""
    texts = [template.split("{}")[0].rstrip() for template in templates]
    return list(dict.fromkeys(text for text in texts if text))


def cache_kwargs(model, layers: List[Tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """Forward arguments that hand ``layers`` (per layer ``(keys, values)``) to the model as its past."""
    from transformers import DynamicCache

    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return {"use_cache": True, name: DynamicCache(ddp_cache_data=layers, config=model.config)}


def model_cache(output) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Per layer ``(keys, values)`` of the cache a forward pass returned (transformers 5 and 4 names)."""
    from transformers import DynamicCache

    cache = output.get("cache", None) or output.get("past_key_values", None)
    if not isinstance(cache, DynamicCache):
        raise TypeError("the model returned no DynamicCache to reuse; set \"z_prefix_cache\": false in the hparams file")
    return [(layer.keys, layer.values) for layer in cache.layers]


@dataclass
class SharedPrefixes:
    """Keys and values of some token sequences (right-padded), for rows that begin with one of them."""

    ids: List[List[int]]
    layers: List[Tuple[torch.Tensor, torch.Tensor]]  # per layer, [prefixes + 1, kv heads, width, head dim]
    mask: torch.Tensor  # [prefixes + 1, width]; the last entry is the empty prefix of rows that share none

    def match(self, row: Sequence[int], within: Optional[int] = None) -> int:
        """Index of the longest prefix that the first ``within`` tokens of ``row`` (all by default) begin
        with, else the empty prefix's index."""
        within = len(row) if within is None else within
        best, best_length = len(self.ids), 0
        for index, ids in enumerate(self.ids):
            if best_length < len(ids) <= within and list(row[: len(ids)]) == ids:
                best, best_length = index, len(ids)
        return best

    def length(self, index: int) -> int:
        return len(self.ids[index]) if index < len(self.ids) else 0

    def to(self, device) -> "SharedPrefixes":
        return SharedPrefixes(ids=self.ids, layers=[(k.to(device), v.to(device)) for k, v in self.layers],
                              mask=self.mask.to(device))

    def past_for(self, indices: Sequence[int]) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
        """Per layer ``(keys, values)`` and the attention mask of the prefixes ``indices``, one row each."""
        select = lambda t: t.index_select(0, torch.as_tensor(list(indices), device=t.device))
        return [(select(k), select(v)) for k, v in self.layers], select(self.mask)


@torch.no_grad()
def shared_prefixes(model, tok, texts: Sequence[str], device) -> Optional[SharedPrefixes]:
    """Run the decoder once over ``texts`` and keep every layer's keys and values (``None`` for no texts)."""
    ids = [prompt_ids(tok, text) for text in texts]
    ids = [list(x) for x in dict.fromkeys(tuple(x) for x in ids if x)]
    if not ids:
        return None
    input_ids, mask = pad_batch(tok, ids, device=device)
    layers = model_cache(model.get_decoder()(input_ids=input_ids, attention_mask=mask, use_cache=True))
    empty = lambda t: torch.cat([t, torch.zeros_like(t[:1])])  # the empty prefix: masked-out zeros
    return SharedPrefixes(ids=ids, layers=[(empty(k), empty(v)) for k, v in layers],
                          mask=torch.cat([mask, torch.zeros_like(mask[:1])]))


@dataclass
class RowsAfterPrefixes:
    """Rows cut after their shared prefix: the rest of each row (right-padded), with the prefix as its past."""

    input_ids: torch.Tensor  # [rows, width of the longest rest]
    own_mask: torch.Tensor
    past: List[Tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values) of each row's prefix
    past_mask: torch.Tensor
    covered: List[int]  # tokens of each row its prefix holds

    def forward_kwargs(self, model) -> dict:
        """Arguments for ``model`` (or its decoder) that run the rests after their prefixes."""
        device = self.input_ids.device
        starts = torch.tensor(self.covered, device=device)[:, None]
        positions = starts + torch.arange(self.input_ids.shape[1], device=device)[None]
        mask = torch.cat([self.past_mask.to(device), self.own_mask], 1)
        return {"input_ids": self.input_ids, "attention_mask": mask, "position_ids": positions,
                **cache_kwargs(model, self.past)}


def after_prefixes(tok, rows: Sequence[Sequence[int]], shared: SharedPrefixes, device,
                   within: Optional[Sequence[int]] = None) -> RowsAfterPrefixes:
    """Each row cut after the longest shared prefix it begins with; ``within[i]``: that prefix must end by
    then (default: anywhere in the row)."""
    within = within if within is not None else [len(row) for row in rows]
    matches = [shared.match(row, limit) for row, limit in zip(rows, within)]
    covered = [shared.length(m) for m in matches]
    input_ids, own_mask = pad_batch(tok, [row[c:] for row, c in zip(rows, covered)], device=device)
    past, past_mask = shared.past_for(matches)
    return RowsAfterPrefixes(input_ids=input_ids, own_mask=own_mask, past=past, past_mask=past_mask, covered=covered)
