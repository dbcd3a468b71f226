"""What a lenient loader left out and why: one warning per kind of problem, and a summary for params.json.

EasyEdit-format files (``dsets.easyedit``) and zsRE files loaded by the driver are read leniently: a record
that cannot be used is reported and skipped instead of failing the whole file, so one broken record among
10,000 does not stop a run, and the user still learns exactly which records were left out.
"""
from __future__ import annotations

import logging
from typing import Dict, List, Optional

# The kinds of problem, as named in the warnings and in params.json.
MISSING_FIELD = "missing or malformed field"
EMPTY_TARGET = "empty target"
SUBJECT_NOT_IN_PROMPT = "subject not in prompt"
BAD_TEMPLATE = "prompt unusable as a template"
SAME_TARGETS = "target_new equals ground_truth"
LOCALITY_TRUTH_DIFFERS = "locality_ground_truth differs from ground_truth"
DUPLICATE_CASE_ID = "duplicate case_id"

FIRST_SHOWN = 5


class UnusableRecord(ValueError):
    """A record that cannot be converted; ``kind`` is one of the kinds above, the message says what is wrong."""

    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind = kind


class SkippedRecords:
    """The records a loader skipped, grouped by kind of problem, each with its case id and what is wrong."""

    def __init__(self, source: str):
        self.source = source
        self.by_kind: Dict[str, List[tuple]] = {}

    def add(self, kind: str, case_id, detail: str) -> None:
        self.by_kind.setdefault(kind, []).append((case_id, detail))

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.by_kind.values())

    def log(self, logger: logging.Logger) -> None:
        """One warning per kind: how many, the first case ids, and the first record's problem in full."""
        for kind, entries in self.by_kind.items():
            first = ", ".join(str(case_id) for case_id, _ in entries[:FIRST_SHOWN])
            more = f" and {len(entries) - FIRST_SHOWN} more" if len(entries) > FIRST_SHOWN else ""
            logger.warning("%s: skipped %d record(s) with %s (case_id %s%s); e.g. %s",
                           self.source, len(entries), kind, first, more, entries[0][1])

    def to_dict(self) -> Optional[dict]:
        """``{"count": n, "by_kind": {kind: {"count", "first_case_ids", "example"}}}``; None when nothing was
        skipped."""
        if not self.by_kind:
            return None
        return {
            "count": len(self),
            "by_kind": {
                kind: {"count": len(entries), "first_case_ids": [c for c, _ in entries[:FIRST_SHOWN]],
                       "example": entries[0][1]}
                for kind, entries in self.by_kind.items()
            },
        }
