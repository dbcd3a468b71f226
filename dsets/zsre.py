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
  ``target_true`` is ``answers[0]`` (else ``pred``, else MEMIT's placeholder ``"<|endoftext|>"``).

EasyEdit's minimal shape (``subject, src, alt, rephrase, loc, loc_ans``, no ``answers``/``pred``) loads too:
:class:`MENDQADataset` picks ``"alt"`` for a file in which no record has ``answers``. A record that cannot be
used (missing field, subject not in ``src``, empty target, ``alt`` equal to the true answer) raises, or with
``skip_invalid`` (the driver's choice) is reported and skipped (``dsets.skipped``).

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

from dsets import skipped as kinds
from dsets.counterfact import check_size, check_template
from dsets.data_files import DataFormatError, find_data_file
from dsets.skipped import SkippedRecords, UnusableRecord

LOG = logging.getLogger(__name__)

# The local copy's name first, then the name MEMIT/ROME publish (only that one is downloadable).
ZSRE_FILES = ("zsre_mem_eval.json", "zsre_mend_eval.json")
EDIT_TARGETS = ("answers", "alt")
# target_true of an EasyEdit-shape record with neither ``answers`` nor ``pred``: the placeholder MEMIT stored
# and EasyEdit's zsRE examples pass as ground truth. No zsRE metric reads it (ECE_GA's attribution does).
UNKNOWN_TRUE_TARGET = "<|endoftext|>"


def convert_zsre_record(raw, index: int, edit_target: str = "answers") -> dict:
    """One raw zsRE record as an editing record; :class:`UnusableRecord` (a ValueError) says why it cannot be."""
    if edit_target not in EDIT_TARGETS:
        raise ValueError(f"edit_target must be one of {EDIT_TARGETS}, got {edit_target!r}")
    if not isinstance(raw, dict):
        raise UnusableRecord(kinds.MISSING_FIELD, f"zsRE record {index}: a {type(raw).__name__}, not an object")
    target_field = "answers" if edit_target == "answers" else "alt"
    required = ("subject", "src", "rephrase", "loc", "loc_ans", target_field)
    missing = [k for k in required if k not in raw]
    if missing:
        raise UnusableRecord(kinds.MISSING_FIELD, f"zsRE record {index}: missing field(s) {', '.join(missing)}")
    malformed = [k for k in ("subject", "src", "rephrase", "loc", "loc_ans", "alt", "pred")
                 if k in raw and not isinstance(raw[k], str)]
    if "answers" in raw and not isinstance(raw["answers"], list):
        malformed.append("answers")
    if malformed:
        raise UnusableRecord(kinds.MISSING_FIELD, f"zsRE record {index}: field(s) {', '.join(malformed)} of the "
                                                  "wrong type")
    subject, src = raw["subject"], raw["src"]
    if not subject or subject not in src:
        raise UnusableRecord(kinds.SUBJECT_NOT_IN_PROMPT,
                             f"zsRE record {index}: subject {subject!r} does not occur in src {src!r}")
    answers = raw.get("answers")
    if edit_target == "answers":
        if not answers or not isinstance(answers[0], str) or not answers[0].strip():
            raise UnusableRecord(kinds.EMPTY_TARGET, f"zsRE record {index}: 'answers' is empty")
        target_new, target_true = answers[0], raw.get("pred") or answers[0]
    else:
        if not raw["alt"].strip():
            raise UnusableRecord(kinds.EMPTY_TARGET, f"zsRE record {index}: 'alt' is empty")
        known = [a for a in (answers or [])[:1] if isinstance(a, str) and a.strip()] or [raw.get("pred")]
        target_new, target_true = raw["alt"], known[0] or UNKNOWN_TRUE_TARGET
        if target_new.strip() == target_true.strip():
            raise UnusableRecord(kinds.SAME_TARGETS, f"zsRE record {index}: alt and the true answer are both "
                                                     f"{target_new!r}")
    prompt = src.replace(subject, "{}", 1)
    problem = check_template(prompt, subject)
    if problem:
        raise UnusableRecord(kinds.BAD_TEMPLATE, f"zsRE record {index}: {problem}")
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
    """The first ``size`` zsRE eval records in the editing format (see the module docstring).

    ``edit_target`` None picks ``"answers"`` when the file's records have ``answers`` and EasyEdit's ``"alt"``
    when none has. With ``skip_invalid`` a record that cannot be used is reported and skipped (``skipped``;
    ``size`` then counts usable records); otherwise the first one raises :class:`DataFormatError`.
    """

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, size: Optional[int] = None,
                 edit_target: Optional[str] = None, skip_invalid: bool = False):
        check_size(size)
        self.path: Path = find_data_file(ZSRE_FILES, data_dir)
        with open(self.path) as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise DataFormatError(f"{self.path}: expected a JSON list of records, got {type(raw).__name__}")
        if edit_target is None:
            edit_target = "answers" if any(isinstance(r, dict) and "answers" in r for r in raw) else "alt"
            if edit_target == "alt":
                LOG.info("%s: no record has 'answers' (EasyEdit's shape): target_new is 'alt'", self.path)
        self.edit_target = edit_target
        self.skipped = SkippedRecords(self.path.name)
        self.data = []
        for index, item in enumerate(raw if skip_invalid or size is None else raw[:size]):
            try:
                self.data.append(convert_zsre_record(item, index, edit_target))
            except UnusableRecord as e:
                if not skip_invalid:
                    raise DataFormatError(f"{self.path}: {e}") from None
                self.skipped.add(e.kind, index, str(e))
        self.skipped.log(LOG)
        self.usable = len(self.data)
        self.data = self.data[:size] if size is not None else self.data
        LOG.info("loaded %d zsRE records from %s (%d skipped)", len(self.data), self.path, len(self.skipped))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]
