"""zsRE metrics of one record, in MEMIT's result format (docs/DESIGN.md section 7).

``compute_rewrite_quality_zsre`` returns, per prompt, the list of per-token top-1 correctness under teacher
forcing::

    rewrite_prompts_correct       [[bool per target_new token]]   the question (src)
    paraphrase_prompts_correct    [[bool per target_new token]]   the rephrased question
    neighborhood_prompts_correct  [[bool per loc_ans token]]      the unrelated NQ question, original answer

MEMIT returns each as one flat list of tokens; here there is one inner list per prompt (the flat list is
their concatenation). Token accuracy is the mean of the booleans.

Unless ``free_generation`` is None, also ``*_prompts_generated_correct`` ([bool] per prompt: the greedy answer
begins with the expected answer, experiments/free_generation.py), ``*_prompts_generated_text`` and
``free_generation``. zsRE's ``target_true`` is no reliable competing answer, so none is checked.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

from experiments.free_generation import FreeGeneration, answer_budget, judged_answers
from util.generate import score_and_answer

PROMPT_KINDS = ("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts")


def compute_rewrite_quality_zsre(model, tok, record: Dict, batch_size: int = 64,
                                 free_generation: Optional[FreeGeneration] = FreeGeneration()) -> Dict:
    """Per-token top-1 correctness on the edit prompt, its paraphrases and the neighbourhood prompts,
    and the free-generation metric."""
    return compute_rewrite_quality_zsre_many(model, tok, [record], batch_size, free_generation)[0]


def _prompt_groups(record: Dict) -> Dict[str, List[Tuple[str, str]]]:
    rewrite = record["requested_rewrite"]
    target_new = rewrite["target_new"]["str"]
    return {
        "rewrite_prompts": [(rewrite["prompt"].format(rewrite["subject"]), target_new)],
        "paraphrase_prompts": [(p, target_new) for p in record.get("paraphrase_prompts", [])],
        "neighborhood_prompts": [(n["prompt"], n["target"]) for n in record.get("neighborhood_prompts", [])],
    }


def compute_rewrite_quality_zsre_many(model, tok, records: Sequence[Dict], batch_size: int = 64,
                                      free_generation: Optional[FreeGeneration] = FreeGeneration()) -> List[Dict]:
    """``compute_rewrite_quality_zsre`` of several records: the prompts of all of them are scored and their
    answers decoded in one ``score_and_answer`` call (each prompt runs once)."""
    groups_per_record = [_prompt_groups(record) for record in records]
    pairs = [pair for groups in groups_per_record for kind in PROMPT_KINDS for pair in groups[kind]]
    budgets = [0 if free_generation is None else answer_budget(tok, t, free_generation) for _, t in pairs]
    outcomes = score_and_answer(model, tok, [p for p, _ in pairs], [[t] for _, t in pairs], budgets,
                                batch_size=batch_size)
    scores = iter(outcome[0][0] for outcome in outcomes)
    results = [{f"{kind}_correct": [list(next(scores).token_correct) for _ in groups[kind]] for kind in PROMPT_KINDS}
               for groups in groups_per_record]
    if free_generation is not None:
        free_groups = [{kind: [(p, t, None) for p, t in groups[kind]] for kind in PROMPT_KINDS}
                       for groups in groups_per_record]
        for ret, free in zip(results, judged_answers(tok, free_groups, [answer for _, answer in outcomes],
                                                     free_generation)):
            ret.update(free)
    return results
