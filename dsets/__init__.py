"""Datasets in MEMIT's formats and the lookup of their files (see docs/DESIGN.md section 6)."""
from dsets.attr_snippets import (
    EASYEDIT_SUBSTITUTE_SOURCE,
    PUBLISHED_SOURCE,
    SUBSTITUTE_SOURCE,
    AttributeSnippets,
    ConsistencyResources,
    consistency_resources,
    consistency_unavailable_reason,
    counterfact_reference_entries,
    easyedit_consistency_resources,
    easyedit_reference_entries,
    load_attribute_snippets,
    substitute_consistency_resources,
)
from dsets.counterfact import CounterFactDataset, MultiCounterFactDataset
from dsets.data_files import (
    DATA_URLS,
    DataFileNotFoundError,
    DataFormatError,
    data_dir_candidates,
    find_data_file,
    locate_data_file,
)
from dsets.easyedit import (
    CF_EASYEDIT_DATASETS,
    EasyEditCounterFactDataset,
    convert_easyedit_counterfact_record,
)
from dsets.knowns import KnownsDataset
from dsets.skipped import SkippedRecords, UnusableRecord
from dsets.tfidf_stats import (
    TfidfVectors,
    cached_tfidf_vectors,
    fit_tfidf_vectors,
    load_tfidf_vectors,
    tfidf_similarity,
)
from dsets.zsre import MENDQADataset, convert_zsre_record

__all__ = [
    "EASYEDIT_SUBSTITUTE_SOURCE",
    "PUBLISHED_SOURCE",
    "SUBSTITUTE_SOURCE",
    "AttributeSnippets",
    "CF_EASYEDIT_DATASETS",
    "ConsistencyResources",
    "CounterFactDataset",
    "DATA_URLS",
    "DataFileNotFoundError",
    "DataFormatError",
    "EasyEditCounterFactDataset",
    "KnownsDataset",
    "MENDQADataset",
    "MultiCounterFactDataset",
    "SkippedRecords",
    "TfidfVectors",
    "UnusableRecord",
    "cached_tfidf_vectors",
    "consistency_resources",
    "consistency_unavailable_reason",
    "convert_easyedit_counterfact_record",
    "convert_zsre_record",
    "counterfact_reference_entries",
    "data_dir_candidates",
    "easyedit_consistency_resources",
    "easyedit_reference_entries",
    "find_data_file",
    "fit_tfidf_vectors",
    "load_attribute_snippets",
    "load_tfidf_vectors",
    "locate_data_file",
    "substitute_consistency_resources",
    "tfidf_similarity",
]
