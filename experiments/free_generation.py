"""The free-generation metric: does the model *say* the target when left to decode greedily?

Teacher forcing (``*_prompts_correct``) asks whether every target token is the argmax given the prompt and
the *true* previous target tokens. Greedy decoding of exactly ``len(target_ids)`` tokens reproduces the
target iff that holds (each step sees the previously generated tokens, which are the target's as long as
they match), so a "first len(target) tokens equal the target" rule would copy ``*_correct`` and measure
nothing new. The stricter reading, in the spirit of the WILD evaluation (Mirage, arXiv 2502.11177: no
truncation to the target's length, a natural stop, the whole answer judged), is applied here without a judge
model (docs/DESIGN.md section 7):

* the **answer** is the greedy continuation of the prompt, ``len(expected target tokens) + extra_tokens``
  new tokens (default 10), cut at the first line break or end-of-text token;
* **success** when the answer, leading white space dropped, begins with the expected target (exact
  characters, case-sensitive) ending at a word boundary (``Rome`` counts in ``Rome, Italy`` but not in
  ``Romeo``), **and** the rest of the answer does not name the competing target as a word (``Rome, not
  Paris`` fails). Expected / competing: ``target_new`` / ``target_true`` on rewrite and paraphrase prompts,
  ``target_true`` / ``target_new`` on neighbourhood prompts (CounterFact); zsRE has no reliable competing
  answer (its ``target_true`` is a QA model's guess or a placeholder), so only the first condition applies.

The answer is compared as text, so a target that the model spells with other tokens (``" R" "ome"``) still
counts; apart from that, and from float ties, success implies ``*_correct``: the metric is never more lenient
than the teacher-forced top-1 rule, and it is stricter when the model goes on past a sub-word of the target
or names the old fact after the new one.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from util.tokens import target_ids

PROMPT_KINDS = ("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts")
LINE_BREAK = re.compile(r"[\r\n]")


@dataclass(frozen=True)
class FreeGeneration:
    """How the answers are decoded and judged; ``to_dict`` is stored with every stage's metrics."""

    extra_tokens: int = 10

    def to_dict(self) -> Dict:
        return {"decoding": "greedy (argmax)", "max_new_tokens": f"target tokens + {self.extra_tokens}",
                "extra_tokens": self.extra_tokens, "stops_at": "line break or end-of-text token",
                "success": "answer begins with the expected target (case-sensitive, whole word) and does not "
                           "name the competing target after it"}


def answer_text(tok, new_ids: Sequence[int]) -> str:
    """The decoded continuation up to the first end-of-text token and line break."""
    eos = tok.eos_token_id
    if eos is not None and eos in new_ids:
        new_ids = new_ids[: list(new_ids).index(eos)]
    return LINE_BREAK.split(tok.decode(list(new_ids), skip_special_tokens=True), maxsplit=1)[0]


def _names(text: str, word: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word) + r"(?!\w)", text) is not None


def answer_correct(answer: str, expected: str, competing: Optional[str] = None) -> bool:
    """The success rule of the module docstring, on one decoded answer."""
    expected = expected.strip()
    answer = answer.lstrip()
    if not expected or not answer.startswith(expected):
        return False
    rest = answer[len(expected):]
    if expected[-1].isalnum() and rest[:1].isalnum():
        return False  # the model went on inside the word: "Romeo" is not "Rome"
    competing = (competing or "").strip()
    if competing and competing != expected and _names(rest, competing):
        return False
    return True


def answer_budget(tok, expected: str, protocol: FreeGeneration) -> int:
    """Tokens decoded for an answer: the expected target's tokens and ``protocol.extra_tokens``."""
    return len(target_ids(tok, expected)) + protocol.extra_tokens


def judged_answers(tok, groups_per_record: Sequence[Dict[str, List[tuple]]], continuations: Sequence[Sequence[int]],
                   protocol: FreeGeneration = FreeGeneration()) -> List[Dict]:
    """``{kind}_generated_correct``, ``{kind}_generated_text`` and ``free_generation`` (the protocol) of each
    record, whose ``groups`` are ``{kind: [(prompt, expected, competing or None), ...]}``; ``continuations``:
    the greedy token ids of every prompt, in the order of the records and ``PROMPT_KINDS`` (``answer_budget``
    tokens each)."""
    answers = iter(answer_text(tok, ids) for ids in continuations)
    results = []
    for groups in groups_per_record:
        out: Dict = {}
        for kind in PROMPT_KINDS:
            items = groups.get(kind, [])
            chunk = [next(answers) for _ in items]
            out[f"{kind}_generated_correct"] = [answer_correct(a, e, c) for a, (_, e, c) in zip(chunk, items)]
            out[f"{kind}_generated_text"] = chunk
        out["free_generation"] = protocol.to_dict()
        results.append(out)
    return results
