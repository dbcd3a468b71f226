"""CounterFact in EasyEdit's simplified format, converted to MEMIT's record format.

The files ``counterfact_easyedit/counterfact-train.json`` (10,000 records) and ``counterfact-val.json``
(1,919) hold real CounterFact case ids, one record each in the fields ``case_id, prompt, subject,
target_new, ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``. Each becomes::

    {"case_id": case_id,
     "requested_rewrite": {"prompt": prompt with the first occurrence of subject replaced by "{}",
                           "subject": subject,
                           "target_new": {"str": target_new}, "target_true": {"str": ground_truth}},
     "paraphrase_prompts": [rephrase_prompt],
     "neighborhood_prompts": [locality_prompt],
     "generation_prompts": [prompt, rephrase_prompt],
     "generation_prompts_source": GENERATION_PROMPTS_SOURCE}

The neighbourhood prompt is scored against ``target_true`` as MEMIT scores its neighbourhood prompts, which
is only right when ``locality_ground_truth == ground_truth``; a record where they differ is skipped.

The format has no relation_id, target ids, attribute or generation prompts. The fluency and consistency
texts are therefore generated from the rewrite and paraphrase prompts (MEMIT's generation prompts are
prompts of the same kind about the subject; the label goes into every case's metrics), and consistency
compares them with the sentences of records whose true object is ``target_new``
(``dsets.attr_snippets.easyedit_reference_entries``, ``easyedit_consistency_resources``). Neither number is
comparable with published CounterFact tables.

Dataset names (``--ds_name``): ``cf_easyedit`` is the train file followed by the val file, each in file order
(both sorted by case_id; the two sets of case ids are disjoint), so its first N records are the train file's
first N for N <= 10,000; ``cf_easyedit_train`` and ``cf_easyedit_val`` are one file each.

Records that cannot be used (a missing field, an empty target, the subject not in the prompt, target_new equal
to ground_truth, a duplicate case_id, ...) are skipped and reported (``dsets.skipped``); ``size`` counts usable
records.
"""
from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from dsets import skipped as kinds
from dsets.counterfact import check_size, check_template
from dsets.data_files import DataFormatError, find_data_file
from dsets.skipped import SkippedRecords, UnusableRecord

LOG = logging.getLogger(__name__)

EASYEDIT_FOLDER = "counterfact_easyedit"
SPLIT_FILES = {"train": "counterfact-train.json", "val": "counterfact-val.json"}
# --ds_name -> the files it reads, in order.
CF_EASYEDIT_DATASETS: Dict[str, Tuple[str, ...]] = {
    "cf_easyedit": ("train", "val"),
    "cf_easyedit_train": ("train",),
    "cf_easyedit_val": ("val",),
}
GENERATION_PROMPTS_SOURCE = ("substitute: the rewrite and paraphrase prompts (EasyEdit's CounterFact has no "
                             "generation prompts)")
TEXT_FIELDS = ("prompt", "subject", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
               "locality_ground_truth")


def convert_easyedit_counterfact_record(raw) -> dict:
    """One EasyEdit CounterFact record in MEMIT's format; :class:`UnusableRecord` says why it cannot be."""
    if not isinstance(raw, dict):
        raise UnusableRecord(kinds.MISSING_FIELD, f"record is a {type(raw).__name__}, not an object")
    case_id = raw.get("case_id")
    if isinstance(case_id, bool) or not isinstance(case_id, int):
        raise UnusableRecord(kinds.MISSING_FIELD, f"case_id must be an integer, got {case_id!r}")
    missing = [k for k in TEXT_FIELDS if not isinstance(raw.get(k), str)]
    if missing:
        raise UnusableRecord(kinds.MISSING_FIELD, f"case_id {case_id}: field(s) {', '.join(missing)} missing or "
                                                  "not strings")
    empty_prompts = [k for k in ("prompt", "subject", "rephrase_prompt", "locality_prompt") if not raw[k].strip()]
    if empty_prompts:
        raise UnusableRecord(kinds.MISSING_FIELD, f"case_id {case_id}: field(s) {', '.join(empty_prompts)} empty")
    empty_targets = [k for k in ("target_new", "ground_truth", "locality_ground_truth") if not raw[k].strip()]
    if empty_targets:
        raise UnusableRecord(kinds.EMPTY_TARGET, f"case_id {case_id}: {', '.join(empty_targets)} empty")
    subject, prompt = raw["subject"], raw["prompt"]
    if subject not in prompt:
        raise UnusableRecord(kinds.SUBJECT_NOT_IN_PROMPT,
                             f"case_id {case_id}: subject {subject!r} does not occur in prompt {prompt!r}")
    template = prompt.replace(subject, "{}", 1)
    problem = check_template(template, subject)
    if problem:
        raise UnusableRecord(kinds.BAD_TEMPLATE, f"case_id {case_id}: {problem}")
    if raw["target_new"].strip() == raw["ground_truth"].strip():
        raise UnusableRecord(kinds.SAME_TARGETS,
                             f"case_id {case_id}: target_new and ground_truth are both {raw['target_new']!r}")
    if raw["locality_ground_truth"] != raw["ground_truth"]:
        raise UnusableRecord(kinds.LOCALITY_TRUTH_DIFFERS,
                             f"case_id {case_id}: locality_ground_truth {raw['locality_ground_truth']!r} is not "
                             f"ground_truth {raw['ground_truth']!r}, so the neighbourhood prompt cannot be scored "
                             "against target_true")
    return {
        "case_id": case_id,
        "requested_rewrite": {
            "prompt": template,
            "subject": subject,
            "target_new": {"str": raw["target_new"]},
            "target_true": {"str": raw["ground_truth"]},
        },
        "paraphrase_prompts": [raw["rephrase_prompt"]],
        "neighborhood_prompts": [raw["locality_prompt"]],
        "generation_prompts": [prompt, raw["rephrase_prompt"]],
        "generation_prompts_source": GENERATION_PROMPTS_SOURCE,
    }


def easyedit_file(split: str, data_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The split's file in ``counterfact_easyedit/`` of a data folder, or directly in it."""
    name = SPLIT_FILES[split]
    return find_data_file((f"{EASYEDIT_FOLDER}/{name}", name), data_dir)


class EasyEditCounterFactDataset(Sequence):
    """The first ``size`` usable records of the named EasyEdit CounterFact file(s) in MEMIT's format.

    ``skipped`` holds the records left out (already logged as warnings); ``paths`` the files read.
    """

    def __init__(self, data_dir: Optional[Union[str, os.PathLike]] = None, ds_name: str = "cf_easyedit",
                 size: Optional[int] = None):
        check_size(size)
        if ds_name not in CF_EASYEDIT_DATASETS:
            raise ValueError(f"unknown EasyEdit CounterFact dataset {ds_name!r}; use one of "
                             f"{', '.join(CF_EASYEDIT_DATASETS)}")
        self.ds_name = ds_name
        self.paths: List[Path] = [easyedit_file(split, data_dir) for split in CF_EASYEDIT_DATASETS[ds_name]]
        self.skipped = SkippedRecords(ds_name)
        self.data: List[dict] = []
        kept_ids = set()
        for path in self.paths:
            with open(path) as f:
                raw = json.load(f)
            if not isinstance(raw, list):
                raise DataFormatError(f"{path}: expected a JSON list of records, got {type(raw).__name__}")
            for index, item in enumerate(raw):
                try:
                    record = convert_easyedit_counterfact_record(item)
                except UnusableRecord as e:
                    case_id = item.get("case_id") if isinstance(item, dict) else None
                    where = case_id if case_id is not None else f"<none: {path.name} index {index}>"
                    self.skipped.add(e.kind, where, f"{path.name}: {e}")
                    continue
                if record["case_id"] in kept_ids:
                    self.skipped.add(kinds.DUPLICATE_CASE_ID, record["case_id"],
                                     f"{path.name}: case_id {record['case_id']} already loaded; this copy is skipped")
                    continue
                kept_ids.add(record["case_id"])
                self.data.append(record)
        self.skipped.log(LOG)
        self.usable = len(self.data)
        if size is not None:
            self.data = self.data[:size]
        LOG.info("loaded %d of %d usable records (%d skipped) from %s", len(self.data), self.usable,
                 len(self.skipped), ", ".join(str(p) for p in self.paths))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item):
        return self.data[item]
