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
from util.tokens import chunks, prompt_target_batch


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
    device = model_device(model)
    pairs = list(zip(prefixes, targets))
    results: List[ContinuationScore] = []
    for batch in chunks(pairs, batch_size):
        ids, mask, positions, wanted = prompt_target_batch(tok, *zip(*batch), device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        for row in range(len(batch)):
            index = torch.as_tensor(positions[row], device=logits.device)
            log_probs = torch.log_softmax(logits[row, index].float(), dim=-1)
            target = torch.as_tensor(wanted[row], device=logits.device)
            nlls = -log_probs.gather(1, target[:, None])[:, 0]
            correct = log_probs.argmax(-1) == target
            results.append(ContinuationScore(nlls.tolist(), correct.tolist()))
    return results


def mean_nlls(model, tok, prefixes: Sequence[str], targets: Sequence[str], batch_size: int = 32) -> List[float]:
    return [s.mean_nll for s in continuation_scores(model, tok, prefixes, targets, batch_size)]
