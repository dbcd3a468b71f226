"""Datasets in MEMIT's formats and the lookup of their files (see DESIGN.md section 6)."""
from dsets.attr_snippets import (
    AttributeSnippets,
    consistency_unavailable_reason,
    load_attribute_snippets,
    load_consistency_resources,
)
from dsets.counterfact import CounterFactDataset, MultiCounterFactDataset
from dsets.data_files import (
    DATA_URLS,
    DataFileNotFoundError,
    data_dir_candidates,
    find_data_file,
    locate_data_file,
)
from dsets.knowns import KnownsDataset
from dsets.tfidf_stats import TfidfVectors, load_tfidf_vectors, tfidf_similarity
from dsets.zsre import MENDQADataset, convert_zsre_record

__all__ = [
    "AttributeSnippets",
    "CounterFactDataset",
    "DATA_URLS",
    "DataFileNotFoundError",
    "KnownsDataset",
    "MENDQADataset",
    "MultiCounterFactDataset",
    "TfidfVectors",
    "consistency_unavailable_reason",
    "convert_zsre_record",
    "data_dir_candidates",
    "find_data_file",
    "load_attribute_snippets",
    "load_consistency_resources",
    "load_tfidf_vectors",
    "locate_data_file",
    "tfidf_similarity",
]
