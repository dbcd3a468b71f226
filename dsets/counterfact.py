"""CounterFact and MultiCounterFact in MEMIT's record format.

A record: ``case_id``, ``requested_rewrite {prompt, relation_id, subject, target_new {str, id},
target_true {str, id}}``, ``paraphrase_prompts``, ``neighborhood_prompts``, ``attribute_prompts``,
``generation_prompts``. Records are returned as loaded (plain dicts); each kept record is checked first.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from dsets.data_files import DataFormatError, find_data_file

LOG = logging.getLogger(__name__)

CF_FILE = "counterfact.json"
MCF_FILE = "multi_counterfact.json"


def check_size(size: Optional[int]) -> Optional[int]:
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
        raise ValueError(f"size must be None or a non-negative integer, got {size!r}")
    return size


def check_template(prompt, subject) -> Optional[str]:
    """Why a (prompt template, subject) pair cannot be used, or None when it can."""
    if not isinstance(prompt, str):
        return f"prompt must be a string, got {type(prompt).__name__}"
    if prompt.count("{}") != 1:
        return f"prompt {prompt!r} must contain '{{}}' exactly once (found {prompt.count('{}')})"
    if prompt.count("{") != 1 or prompt.count("}") != 1:
        return f"prompt {prompt!r} has braces other than its '{{}}' placeholder"
    if not isinstance(subject, str) or not subject.strip():
        return f"subject must be a non-empty string, got {subject!r}"
    return None


def _record_problem(record) -> Optional[str]:
    if not isinstance(record, dict):
        return f"record is a {type(record).__name__}, not an object"
    rewrite = record.get("requested_rewrite")
    if not isinstance(rewrite, dict):
        return "requested_rewrite is missing or not an object"
    problem = check_template(rewrite.get("prompt"), rewrite.get("subject"))
    if problem:
        return f"requested_rewrite: {problem}"
    for key in ("target_new", "target_true"):
        target = rewrite.get(key)
        if not isinstance(target, dict) or not isinstance(target.get("str"), str) or not target["str"].strip():
            return f"requested_rewrite.{key}.str is missing or empty"
    return None


class CounterFactDataset(Sequence):
    """The first ``size`` records of counterfact.json (or multi_counterfact.json when ``multi``)."""

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, multi: bool = False,
                 size: Optional[int] = None):
        check_size(size)
        self.path: Path = find_data_file(MCF_FILE if multi else CF_FILE, data_dir)
        with open(self.path) as f:
            raw = json.load(f)
        if not isinstance(raw, list):
            raise DataFormatError(f"{self.path}: expected a JSON list of records, got {type(raw).__name__}")
        self.data = raw[:size] if size is not None else raw
        for index, record in enumerate(self.data):
            problem = _record_problem(record)
            if problem:
                case_id = record.get("case_id", f"<none, index {index}>") if isinstance(record, dict) else index
                raise DataFormatError(f"{self.path}: case_id {case_id}: {problem}")
        LOG.info("loaded %d records from %s", len(self.data), self.path)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]


class MultiCounterFactDataset(CounterFactDataset):
    """multi_counterfact.json (``--ds_name mcf``)."""

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, size: Optional[int] = None):
        super().__init__(data_dir, multi=True, size=size)
