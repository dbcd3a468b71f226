"""Wikipedia snippets about entities with a given (relation, object), for the consistency metric.

``attribute_snippets.json`` (ROME/MEMIT) is a list of ``{"relation_id", "target_id", "samples": [{"name",
"text"}, ...]}``. ``snips[relation_id][target_id]`` is the list of samples of every subject with that
relation and object. The file is looked up like a data file but never downloaded here;
``load_attribute_snippets`` returns None when it is missing.

The shared data folder has neither the snippets nor ROME's tf-idf statistics, so ``consistency_resources``
falls back to a labelled substitute (``SUBSTITUTE_SOURCE``): reference sentences built from CounterFact
itself (``counterfact_reference_entries``) and tf-idf statistics fitted on WikiText paragraphs plus those
CounterFact sentences, cached in the statistics folder. Its scores are not comparable with published ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

from dsets.data_files import data_dir_candidates, locate_data_file
from dsets.easyedit import EasyEditCounterFactDataset
from dsets.tfidf_stats import IDF_FILE, VOCAB_FILE, TfidfVectors, cached_tfidf_vectors, load_tfidf_vectors
from util.paths import get_paths

LOG = logging.getLogger(__name__)

SNIPPETS_FILE = "attribute_snippets.json"
CONSISTENCY_FILES = (SNIPPETS_FILE, IDF_FILE, VOCAB_FILE)

PUBLISHED_SOURCE = "published: ROME attribute snippets + tf-idf statistics"
SUBSTITUTE_SOURCE = "tf-idf substitute: WikiText+CounterFact"
EASYEDIT_SUBSTITUTE_SOURCE = ("tf-idf substitute: WikiText+CounterFact statistics; references: EasyEdit CounterFact "
                              "sentences stating the same object (any relation)")
# The relation of references keyed by object only: EasyEdit's CounterFact has neither relation nor object ids.
ANY_RELATION = "*"
SUBSTITUTE_CACHE_DIR = "tfidf_substitute"
# Changing how the substitute corpus is built must change this, so that cached statistics are refitted.
SUBSTITUTE_RECIPE = "1: WikiText paragraphs + unique CounterFact sentences; sklearn-default tf-idf"
WIKITEXT_FILES = ("wikitext/wiki.valid.raw", "wikitext/wiki.test.raw")
COUNTERFACT_FILES = ("counterfact.json", "multi_counterfact.json")


class AttributeSnippets:
    """``snips[relation_id][target_id] -> [{"name": subject, "text": snippet}, ...]`` (empty if unknown)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        with open(self.path) as f:
            self._index(json.load(f))

    @classmethod
    def from_entries(cls, entries: Sequence[dict]) -> "AttributeSnippets":
        """Snippets from entries in the file's format, e.g. ``counterfact_reference_entries``."""
        snippets = cls.__new__(cls)
        snippets.path = None
        snippets._index(entries)
        return snippets

    def _index(self, entries: Sequence[dict]) -> None:
        self._data: Dict[str, Dict[str, List[dict]]] = defaultdict(lambda: defaultdict(list))
        for entry in entries:
            self._data[entry["relation_id"]][entry["target_id"]].extend(entry["samples"])

    def __getitem__(self, relation_id: str) -> Dict[str, List[dict]]:
        return self._data[relation_id]

    def texts(self, relation_id: str, target_id: str) -> List[str]:
        return [sample["text"] for sample in self._data.get(relation_id, {}).get(target_id, [])]


def snippet_key(rewrite: dict) -> Tuple[str, str]:
    """Where the references of a rewrite's ``target_new`` are filed: ``(relation_id, target id)`` for MEMIT's
    records, ``(ANY_RELATION, the target string)`` for records without ids (EasyEdit's CounterFact)."""
    target = rewrite["target_new"]
    if rewrite.get("relation_id") is not None and target.get("id") is not None:
        return rewrite["relation_id"], target["id"]
    return ANY_RELATION, target["str"]


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


def counterfact_reference_entries(records: Sequence[dict]) -> List[dict]:
    """Snippet entries (``{"relation_id", "target_id", "samples"}``) made of CounterFact sentences that state
    a true ``(subject, relation, object)``: the rewrite prompt and the neighbourhood prompts completed with
    ``target_true``, and the attribute prompts (other subjects that have ``target_new``) completed with
    ``target_new``. They stand in for ROME's Wikipedia snippets about subjects with that relation and object;
    duplicates are dropped, the first occurrence kept."""
    samples: Dict[Tuple[str, str], Dict[str, dict]] = defaultdict(dict)

    def add(relation_id: str, target: dict, name: str, prompt: str) -> None:
        text = f"{prompt} {target['str']}"
        samples[(relation_id, target["id"])].setdefault(text, {"name": name, "text": text})

    for record in records:
        rewrite = record["requested_rewrite"]
        relation_id, true, new = rewrite["relation_id"], rewrite["target_true"], rewrite["target_new"]
        add(relation_id, true, rewrite["subject"], rewrite["prompt"].format(rewrite["subject"]))
        for prompt in record.get("neighborhood_prompts", []):
            add(relation_id, true, "", prompt)
        for prompt in record.get("attribute_prompts", []):
            add(relation_id, new, "", prompt)
    return [{"relation_id": relation_id, "target_id": target_id, "samples": list(by_text.values())}
            for (relation_id, target_id), by_text in samples.items()]


def easyedit_reference_entries(records: Sequence[dict]) -> List[dict]:
    """Snippet entries of true sentences of EasyEdit's CounterFact, filed under
    ``(ANY_RELATION, object string)``: each record's rewrite prompt and neighbourhood prompt completed with
    ``target_true`` (the loader checked that the neighbourhood's truth is the same). They stand in for ROME's
    Wikipedia snippets about subjects that have an object, across relations since the format has none;
    duplicates are dropped, the first kept."""
    samples: Dict[str, Dict[str, dict]] = {}
    for record in records:
        rewrite = record["requested_rewrite"]
        true = rewrite["target_true"]["str"]
        sentences = [(rewrite["subject"], rewrite["prompt"].format(rewrite["subject"]))]
        sentences += [("", prompt) for prompt in record.get("neighborhood_prompts", [])]
        for name, prompt in sentences:
            text = f"{prompt} {true}"
            samples.setdefault(true, {}).setdefault(text, {"name": name, "text": text})
    return [{"relation_id": ANY_RELATION, "target_id": target, "samples": list(by_text.values())}
            for target, by_text in samples.items()]


def wikitext_paragraphs(path: Union[str, os.PathLike]) -> Iterator[str]:
    """The non-empty, non-heading lines of a raw WikiText file (one paragraph each, like ROME's snippets)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("="):
                yield line


def _counterfact_sentences(records: Sequence[dict], entries: Sequence[dict]) -> List[str]:
    """Reference sentences plus paraphrase and generation prompts, each once, for the idf corpus."""
    texts = [sample["text"] for entry in entries for sample in entry["samples"]]
    for record in records:
        texts += record.get("paraphrase_prompts", []) + record.get("generation_prompts", [])
    return list(dict.fromkeys(texts))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ConsistencyResources:
    """What the consistency metric needs, and which kind it is.

    ``source`` is ``PUBLISHED_SOURCE`` or ``SUBSTITUTE_SOURCE`` and is stored with every reference score;
    when nothing is available ``snippets``/``vectors``/``source`` are None and ``unavailable_reason`` says why.
    """

    snippets: Optional[AttributeSnippets]
    vectors: Optional[TfidfVectors]
    source: Optional[str]
    unavailable_reason: Optional[str] = None


def substitute_consistency_resources(
    data_dir: Optional[Union[str, os.PathLike]] = None,
    stats_dir: Optional[Union[str, os.PathLike]] = None,
) -> ConsistencyResources:
    """The WikiText+CounterFact substitute; its tf-idf statistics are cached in
    ``<stats_dir>/tfidf_substitute`` (default: the project's STATS_DIR) and refitted when an input changes."""
    counterfact_path = locate_data_file(COUNTERFACT_FILES, data_dir)
    wikitext_paths = [locate_data_file(name, data_dir) for name in WIKITEXT_FILES]
    missing = ([] if counterfact_path else [" or ".join(COUNTERFACT_FILES)]) + [
        name for name, path in zip(WIKITEXT_FILES, wikitext_paths) if path is None
    ]
    if missing:
        folders = ", ".join(str(folder) for folder, _ in data_dir_candidates(data_dir))
        return ConsistencyResources(None, None, None, (
            f"{consistency_unavailable_reason(data_dir)}; the substitute needs {', '.join(missing)}, "
            f"not found in the data folders ({folders}) either"
        ))
    with open(counterfact_path) as f:
        records = json.load(f)
    entries = counterfact_reference_entries(records)
    inputs = [counterfact_path, *wikitext_paths]
    fingerprint = {"recipe": SUBSTITUTE_RECIPE, "files": {path.name: _sha256(path) for path in inputs}}

    def documents() -> Iterator[str]:
        for path in wikitext_paths:
            yield from wikitext_paragraphs(path)
        yield from _counterfact_sentences(records, entries)

    folder = Path(stats_dir if stats_dir is not None else get_paths().stats_dir) / SUBSTITUTE_CACHE_DIR
    vectors = cached_tfidf_vectors(folder, fingerprint, documents)
    return ConsistencyResources(AttributeSnippets.from_entries(entries), vectors, SUBSTITUTE_SOURCE)


def easyedit_consistency_resources(
    data_dir: Optional[Union[str, os.PathLike]] = None,
    stats_dir: Optional[Union[str, os.PathLike]] = None,
) -> ConsistencyResources:
    """The consistency substitute for EasyEdit's CounterFact (no relation ids, no snippets): the references
    of ``target_new`` are the sentences of every usable record of both EasyEdit files whose true object is
    that string (``easyedit_reference_entries``), scored with the WikiText+CounterFact tf-idf statistics of
    ``substitute_consistency_resources``."""
    statistics = substitute_consistency_resources(data_dir, stats_dir)
    if statistics.vectors is None:
        return statistics
    try:
        records = EasyEditCounterFactDataset(data_dir, "cf_easyedit")
    except FileNotFoundError as e:
        return ConsistencyResources(None, None, None, f"the EasyEdit CounterFact files are needed for the "
                                                      f"references: {e}")
    snippets = AttributeSnippets.from_entries(easyedit_reference_entries(records))
    return ConsistencyResources(snippets, statistics.vectors, EASYEDIT_SUBSTITUTE_SOURCE)


def consistency_resources(
    data_dir: Optional[Union[str, os.PathLike]] = None,
    stats_dir: Optional[Union[str, os.PathLike]] = None,
) -> ConsistencyResources:
    """The published snippets and statistics when all three files are in the data folders, else the labelled
    substitute, else nothing (with the reason)."""
    if consistency_unavailable_reason(data_dir) is None:
        return ConsistencyResources(load_attribute_snippets(data_dir), load_tfidf_vectors(data_dir), PUBLISHED_SOURCE)
    LOG.warning("published consistency files missing (%s); using the %s", ", ".join(CONSISTENCY_FILES),
                SUBSTITUTE_SOURCE)
    resources = substitute_consistency_resources(data_dir, stats_dir)
    if resources.unavailable_reason is not None:
        LOG.warning("consistency (reference score) unavailable: %s", resources.unavailable_reason)
    return resources
