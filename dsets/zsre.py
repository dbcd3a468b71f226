"""zsRE question answering (MEND's eval split) converted to the editing record format.

Raw records have ``subject, src, pred, rephrase, alt, answers, loc, loc_ans`` (and sometimes ``cond``).
Each becomes::

    {"case_id": i,                                   # index in the file, as in MEMIT
     "requested_rewrite": {"prompt": src with the first occurrence of subject replaced by "{}",
                           "subject": subject,
                           "target_new": {"str": ...}, "target_true": {"str": ...}},
     "paraphrase_prompts": [rephrase],
     "neighborhood_prompts": [{"prompt": loc + "?", "target": loc_ans}],
     "attribute_prompts": [], "generation_prompts": []}

Targets (``edit_target``):

- ``"answers"`` (default, the ROME/MEMIT/AlphaEdit/ECE convention behind published zsRE tables):
  ``target_new`` is the gold answer ``answers[0]``; ``target_true`` is ``pred``, the answer of the QA model
  that built the split. MEMIT stored the GPT-2 string ``"<|endoftext|>"`` there, which no zsRE metric reads
  and which is not a word for other tokenizers.
- ``"alt"`` (the MEND/EasyEdit convention): ``target_new`` is the alternative answer ``alt`` and
  ``target_true`` is ``answers[0]``.

MEMIT splits the locality answer into one prompt per token (``loc + "?" + first i answer tokens``); here the
whole answer is one target scored token by token under teacher forcing, which tests the same tokens without
needing a tokenizer at load time. ``"?"`` is appended to ``loc`` as MEMIT does (the raw ``loc`` has none).
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from dsets.counterfact import check_size, check_template
from dsets.data_files import DataFormatError, find_data_file

LOG = logging.getLogger(__name__)

# The local copy's name first, then the name MEMIT/ROME publish (only that one is downloadable).
ZSRE_FILES = ("zsre_mem_eval.json", "zsre_mend_eval.json")
EDIT_TARGETS = ("answers", "alt")


def convert_zsre_record(raw: dict, index: int, edit_target: str = "answers") -> dict:
    """One raw zsRE record as an editing record; ValueError if its subject is not in its question."""
    if edit_target not in EDIT_TARGETS:
        raise ValueError(f"edit_target must be one of {EDIT_TARGETS}, got {edit_target!r}")
    missing = [k for k in ("subject", "src", "rephrase", "answers", "loc", "loc_ans") if k not in raw]
    if edit_target == "alt" and "alt" not in raw:
        missing.append("alt")
    if missing:
        raise ValueError(f"zsRE record {index}: missing field(s) {', '.join(missing)}")
    subject, src = raw["subject"], raw["src"]
    if not isinstance(subject, str) or not subject or subject not in src:
        raise ValueError(f"zsRE record {index}: subject {subject!r} does not occur in src {src!r}")
    if not raw["answers"]:
        raise ValueError(f"zsRE record {index}: 'answers' is empty")
    prompt = src.replace(subject, "{}", 1)
    problem = check_template(prompt, subject)
    if problem:
        raise ValueError(f"zsRE record {index}: {problem}")
    if edit_target == "answers":
        target_new, target_true = raw["answers"][0], raw.get("pred", raw["answers"][0])
    else:
        target_new, target_true = raw["alt"], raw["answers"][0]
    loc = raw["loc"] if raw["loc"].endswith("?") else raw["loc"] + "?"
    return {
        "case_id": index,
        "requested_rewrite": {
            "prompt": prompt,
            "subject": subject,
            "target_new": {"str": target_new},
            "target_true": {"str": target_true},
        },
        "paraphrase_prompts": [raw["rephrase"]],
        "neighborhood_prompts": [{"prompt": loc, "target": raw["loc_ans"]}],
        "attribute_prompts": [],
        "generation_prompts": [],
    }


class MENDQADataset(Sequence):
    """The first ``size`` zsRE eval records in the editing format (see the module docstring)."""

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, size: Optional[int] = None,
                 edit_target: str = "answers"):
        check_size(size)
        self.path: Path = find_data_file(ZSRE_FILES, data_dir)
        with open(self.path) as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise DataFormatError(f"{self.path}: expected a JSON list of records, got {type(raw).__name__}")
        raw = raw[:size] if size is not None else raw
        try:
            self.data = [convert_zsre_record(r, i, edit_target) for i, r in enumerate(raw)]
        except ValueError as e:
            raise DataFormatError(f"{self.path}: {e}") from None
        LOG.info("loaded %d zsRE records from %s", len(self.data), self.path)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]
