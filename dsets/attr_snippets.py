"""Wikipedia snippets about entities with a given (relation, object), for the consistency metric.

``attribute_snippets.json`` (ROME/MEMIT) is a list of ``{"relation_id", "target_id", "samples": [{"name",
"text"}, ...]}``. ``snips[relation_id][target_id]`` is the list of samples of every subject with that
relation and object. The file is looked up like a data file but never downloaded here;
``load_attribute_snippets`` returns None when it is missing.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

from dsets.data_files import data_dir_candidates, locate_data_file
from dsets.tfidf_stats import IDF_FILE, VOCAB_FILE, TfidfVectors, load_tfidf_vectors

LOG = logging.getLogger(__name__)

SNIPPETS_FILE = "attribute_snippets.json"
CONSISTENCY_FILES = (SNIPPETS_FILE, IDF_FILE, VOCAB_FILE)


class AttributeSnippets:
    """``snips[relation_id][target_id] -> [{"name": subject, "text": snippet}, ...]`` (empty if unknown)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        with open(self.path) as f:
            entries = json.load(f)
        self._data: Dict[str, Dict[str, List[dict]]] = defaultdict(lambda: defaultdict(list))
        for entry in entries:
            self._data[entry["relation_id"]][entry["target_id"]].extend(entry["samples"])

    def __getitem__(self, relation_id: str) -> Dict[str, List[dict]]:
        return self._data[relation_id]

    def texts(self, relation_id: str, target_id: str) -> List[str]:
        return [sample["text"] for sample in self._data.get(relation_id, {}).get(target_id, [])]


def load_attribute_snippets(data_dir: Optional[Union[str, os.PathLike]] = None) -> Optional[AttributeSnippets]:
    """The snippets from the data folders, or None if the file is missing."""
    path = locate_data_file(SNIPPETS_FILE, data_dir)
    if path is None:
        LOG.info("%s not found; the consistency metric will be unavailable", SNIPPETS_FILE)
        return None
    return AttributeSnippets(path)


def consistency_unavailable_reason(data_dir: Optional[Union[str, os.PathLike]] = None) -> Optional[str]:
    """None when snippets and tf-idf statistics are all present, else a sentence saying what is missing."""
    missing = [name for name in CONSISTENCY_FILES if locate_data_file(name, data_dir) is None]
    if not missing:
        return None
    folders = ", ".join(str(folder) for folder, _ in data_dir_candidates(data_dir))
    return (
        f"{', '.join(missing)} not found in the data folders ({folders}); the reference score needs "
        f"ROME's attribute snippets and tf-idf statistics ({', '.join(CONSISTENCY_FILES)}), which are not "
        "downloaded automatically"
    )


def load_consistency_resources(
    data_dir: Optional[Union[str, os.PathLike]] = None,
) -> Tuple[Optional[AttributeSnippets], Optional[TfidfVectors]]:
    """``(snippets, tf-idf vectors)`` for the consistency metric, or ``(None, None)`` if any file is missing."""
    reason = consistency_unavailable_reason(data_dir)
    if reason is not None:
        LOG.warning("consistency (reference score) unavailable: %s", reason)
        return None, None
    return load_attribute_snippets(data_dir), load_tfidf_vectors(data_dir)
