"""Scoring continuations under teacher forcing: the primitive behind every metric.

``continuation_scores`` returns, for each (prefix, target) pair, the per-token negative log-likelihoods
of the target and whether each target token is the model's top-1 prediction. Metrics (CounterFact
probabilities, zsRE token accuracy, downstream label likelihoods) are built from it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from util.models import model_device
from util.tokens import chunks, pad_batch, prompt_ids, target_ids


@dataclass
class ContinuationScore:
    token_nlls: List[float]
    token_correct: List[bool]

    @property
    def mean_nll(self) -> float:
        return sum(self.token_nlls) / len(self.token_nlls)


def left_padded_logits(model, tok, rows: Sequence[Sequence[int]], keep: int, device) -> torch.Tensor:
    """Logits of the last ``keep`` positions of each row, rows padded on the left so that every row ends
    in the last column (a row of length ``n`` starts at column ``width - n``). Only those positions go
    through the output embedding (``logits_to_keep``); explicit position ids keep absolute-position
    models (GPT-2) exact under left padding."""
    ids, mask = pad_batch(tok, rows, device=device, side="left")
    parameters = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in parameters else {}
    if "position_ids" in parameters:
        kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = keep
    return model(input_ids=ids, attention_mask=mask, **kwargs).logits[:, -keep:]


def trailing_target_log_probs(logits: torch.Tensor, targets: Sequence[Sequence[int]],
                              rows: Optional[Sequence[int]] = None, ends: Optional[Sequence[int]] = None):
    """For rows that end with their target tokens (``left_padded_logits`` of ``prompt + target`` with
    ``keep > max target length``): ``(log_probs, row, correct)``, one entry per target token, where
    ``log_probs`` is the log-probability of the token (differentiable), ``row`` its row and ``correct``
    whether it is the top-1 prediction.

    By default target ``j`` is read from row ``j`` and that row ends with all its tokens. ``rows`` maps
    targets to rows instead (several targets may share one), and ``ends[j]`` says how many of target
    ``j``'s tokens its row ends with: 0 for a row that is the prompt alone, read at its last position."""
    keep = logits.shape[1]
    rows = range(len(targets)) if rows is None else rows
    ends = [len(t) for t in targets] if ends is None else ends
    row = torch.tensor([r for r, t in zip(rows, targets) for _ in t], device=logits.device)
    # Token i of a target is predicted by the position just before it.
    position = torch.tensor([keep - end - 1 + i for t, end in zip(targets, ends) for i in range(len(t))],
                            device=logits.device)
    wanted = torch.tensor([token for t in targets for token in t], device=logits.device)
    log_softmax = torch.log_softmax(logits[row, position].float(), dim=-1)
    return log_softmax.gather(1, wanted[:, None])[:, 0], row, log_softmax.argmax(-1) == wanted


@torch.no_grad()
def continuation_scores(
    model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> List[ContinuationScore]:
    """Score ``target`` (with a leading space) after ``prefix`` for each pair, batched.

    Pairs with one-token targets share one row per distinct prefix, the prefix alone read at its last
    position, so the label words of a classification prompt cost one forward, not one per label. Rows are
    batched in order of length, so many short prompts (several records at once) carry little padding."""
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    device = model_device(model)
    pairs = [(prompt_ids(tok, p), target_ids(tok, t)) for p, t in zip(prefixes, targets)]
    row_tokens: List[List[int]] = []
    row_pairs: List[List[int]] = []
    shared_row: Dict[tuple, int] = {}
    for i, (prefix, target) in enumerate(pairs):
        if len(target) == 1 and tuple(prefix) in shared_row:
            row_pairs[shared_row[tuple(prefix)]].append(i)
            continue
        if len(target) == 1:
            shared_row[tuple(prefix)] = len(row_tokens)
        row_tokens.append(prefix if len(target) == 1 else prefix + target)
        row_pairs.append([i])
    results: List[Optional[ContinuationScore]] = [None] * len(pairs)
    by_length = sorted(range(len(row_tokens)), key=lambda r: len(row_tokens[r]))  # little padding per batch
    for batch in chunks(by_length, batch_size):
        members = [(k, i) for k, r in enumerate(batch) for i in row_pairs[r]]
        wanted = [pairs[i][1] for _, i in members]
        ends = [0 if len(t) == 1 else len(t) for t in wanted]
        keep = max(end + 1 for end in ends)
        logits = left_padded_logits(model, tok, [row_tokens[r] for r in batch], keep, device)
        log_probs, _, correct = trailing_target_log_probs(logits, wanted, [k for k, _ in members], ends)
        lengths = [len(t) for t in wanted]
        for (_, i), nlls, hits in zip(members, (-log_probs).split(lengths), correct.split(lengths)):
            results[i] = ContinuationScore(nlls.tolist(), hits.tolist())
    return results


def mean_nlls(model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[float]:
    return [s.mean_nll for s in continuation_scores(model, tok, prefixes, targets, batch_size)]
