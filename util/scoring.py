"""Scoring continuations under teacher forcing: the primitive behind every metric.

``continuation_scores`` returns, for each (prefix, target) pair, the per-token negative log-likelihoods
of the target and whether each target token is the model's top-1 prediction. Metrics (CounterFact
probabilities, zsRE token accuracy, downstream label likelihoods) are built from it.
"""
from __future__ import annotations

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


@torch.no_grad()
def continuation_scores(
    model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32
) -> List[ContinuationScore]:
    """Score ``target`` (with a leading space) after ``prefix`` for each pair, batched."""
    if len(prefixes) != len(targets):
        raise ValueError(f"{len(prefixes)} prefixes but {len(targets)} targets")
    pairs = [(prompt_ids(tok, p), target_ids(tok, t)) for p, t in zip(prefixes, targets)]
    device = model_device(model)
    results: List[ContinuationScore] = []
    for batch in chunks(pairs, batch_size):
        ids, mask = pad_batch(tok, [p + t for p, t in batch], device=device, side="right")
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row, (prefix, target) in enumerate(batch):
            start = len(prefix) - 1
            positions = torch.arange(start, start + len(target), device=logits.device)
            log_probs = torch.log_softmax(logits[row, positions].float(), dim=-1)
            wanted = torch.as_tensor(target, device=logits.device)
            nlls = -log_probs.gather(1, wanted[:, None])[:, 0]
            correct = log_probs.argmax(-1) == wanted
            results.append(ContinuationScore(nlls.tolist(), correct.tolist()))
    return results


def mean_nlls(model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[float]:
    return [s.mean_nll for s in continuation_scores(model, tok, prefixes, targets, batch_size)]
