"""Tokenisation helpers shared by editing and evaluation.

Conventions (MEMIT's): targets are tokenised with one leading space and no special tokens; prompts are
tokenised as the tokenizer does by default (with BOS where it adds one). Batches are padded here, on the
side we choose, so positions computed from the left stay valid whatever ``tok.padding_side`` says.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch


def target_ids(tok, target: str) -> List[int]:
    """Token ids of a target string with exactly one leading space, no BOS/EOS."""
    ids = tok(" " + target.lstrip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def prompt_ids(tok, text: str) -> List[int]:
    return tok(text)["input_ids"]


def pad_token_id(tok) -> int:
    if tok.pad_token_id is not None:
        return tok.pad_token_id
    if tok.eos_token_id is not None:
        return tok.eos_token_id
    return 0


def pad_batch(
    tok, sequences: Sequence[Sequence[int]], device=None, side: str = "right"
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` for token id lists padded on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    length = max(len(s) for s in sequences)
    pad = pad_token_id(tok)
    ids = torch.full((len(sequences), length), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not len(seq):
            continue
        span = slice(0, len(seq)) if side == "right" else slice(length - len(seq), length)
        ids[row, span] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def chunks(items: Sequence, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def even_chunks(items: Sequence, size: int):
    """As few chunks of at most ``size`` items as ``chunks`` gives, of nearly equal sizes (300 items in chunks
    of at most 256: 150 and 150, not 256 and 44)."""
    count = -(-len(items) // size) if size > 0 else 0
    return chunks(items, -(-len(items) // count)) if count else iter(())


def leading_special_ids(tok) -> List[int]:
    """Tokens the tokenizer puts in front of every text (a BOS token), possibly none."""
    with_special = tok("x")["input_ids"]
    plain = tok("x", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start]
    return []
