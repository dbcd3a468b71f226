"""Batched text generation with left padding and a full attention mask.

The upstream context-template generator produced garbage (``'The-, the the--,, a. {}'``) because it
passed only a slice of the attention mask with left-padded prompts; here the whole mask goes to
``generate`` together with the padded ids, so every row sees only its own tokens.
"""
from __future__ import annotations

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
