"""Scoring continuations under teacher forcing: the primitive behind every metric.

``continuation_scores`` returns, for each (prefix, target) pair, the per-token negative log-likelihoods
of the target and whether each target token is the model's top-1 prediction. Metrics (CounterFact
probabilities, zsRE token accuracy, downstream label likelihoods) are built from it.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import List, Sequence

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


def trailing_target_log_probs(logits: torch.Tensor, targets: Sequence[Sequence[int]]):
    """For rows that end with their target tokens (``left_padded_logits`` of ``prompt + target`` with
    ``keep > max target length``): ``(log_probs, row, correct)``, one entry per target token, where
    ``log_probs`` is the log-probability of the token (differentiable), ``row`` its row and ``correct``
    whether it is the top-1 prediction."""
    keep = logits.shape[1]
    row = torch.tensor([r for r, t in enumerate(targets) for _ in t], device=logits.device)
    # The last len(t) tokens are predicted by the positions just before them.
    position = torch.tensor([keep - len(t) - 1 + i for t in targets for i in range(len(t))], device=logits.device)
    wanted = torch.tensor([token for t in targets for token in t], device=logits.device)
    log_softmax = torch.log_softmax(logits[row, position].float(), dim=-1)
    return log_softmax.gather(1, wanted[:, None])[:, 0], row, log_softmax.argmax(-1) == wanted


@torch.no_grad()
def continuation_scores(
    model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> List[ContinuationScore]:
    """Score ``target`` (with a leading space) after ``prefix`` for each pair, batched."""
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    device = model_device(model)
    pairs = [(prompt_ids(tok, p), target_ids(tok, t)) for p, t in zip(prefixes, targets)]
    results: List[ContinuationScore] = []
    for batch in chunks(pairs, batch_size):
        wanted = [t for _, t in batch]
        logits = left_padded_logits(model, tok, [p + t for p, t in batch], max(map(len, wanted)) + 1, device)
        log_probs, _, correct = trailing_target_log_probs(logits, wanted)
        for nlls, hits in zip((-log_probs).split([len(t) for t in wanted]), correct.split([len(t) for t in wanted])):
            results.append(ContinuationScore(nlls.tolist(), hits.tolist()))
    return results


def mean_nlls(model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[float]:
    return [s.mean_nll for s in continuation_scores(model, tok, prefixes, targets, batch_size)]
