"""known_1000.json: facts GPT-2 XL knows (``known_id, subject, attribute, template, prediction, prompt,
relation_id``), used by causal tracing."""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from dsets.data_files import DataFormatError, find_data_file

LOG = logging.getLogger(__name__)

KNOWNS_FILE = "known_1000.json"
KNOWNS_FIELDS = ("subject", "attribute", "template", "prompt")


class KnownsDataset(Sequence):
    """The records of known_1000.json, as loaded; each must name its subject, attribute and prompt."""

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None):
        self.path: Path = find_data_file(KNOWNS_FILE, data_dir)
        with open(self.path) as f:
            self.data = json.load(f)
        if not isinstance(self.data, list):
            raise DataFormatError(f"{self.path}: expected a JSON list of records, got {type(self.data).__name__}")
        for index, record in enumerate(self.data):
            missing = [k for k in KNOWNS_FIELDS if not isinstance(record, dict) or k not in record]
            if missing:
                raise DataFormatError(f"{self.path}: record {index}: missing field(s) {', '.join(missing)}")
            if record["subject"] not in record["prompt"]:
                raise ValueError(
                    f"{self.path}: record {index}: subject {record['subject']!r} not in prompt {record['prompt']!r}"
                )
        LOG.info("loaded %d known facts from %s", len(self.data), self.path)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]
