"""TF-IDF statistics (``idf.npy`` + ``tfidf_vocab.json``) for the CounterFact consistency metric.

``TfidfVectors`` reproduces what ROME/MEMIT get from scikit-learn's ``TfidfVectorizer`` with default settings
and the stored idf vector: lower-cased tokens matching ``(?u)\\b\\w\\w+\\b``, raw term counts times idf,
rows scaled to unit L2 norm. It is plain numpy, so no private scikit-learn attributes are touched.
The statistics are looked up like data files but never downloaded here; ``load_tfidf_vectors`` returns None
when they are missing. ``fit_tfidf_vectors`` computes the same statistics from local documents (for the
labelled substitute of the consistency metric) and ``cached_tfidf_vectors`` keeps them in a statistics folder.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

import numpy as np

from dsets.data_files import locate_data_file
from util.io import atomic_write, atomic_write_json

LOG = logging.getLogger(__name__)

IDF_FILE = "idf.npy"
VOCAB_FILE = "tfidf_vocab.json"
CACHE_META_FILE = "fingerprint.json"
TOKEN_PATTERN = re.compile(r"(?u)\b\w\w+\b")


class TfidfVectors:
    """TF-IDF vectors over a fixed vocabulary (term -> column) and idf weights."""

    def __init__(self, idf: np.ndarray, vocab: Dict[str, int]):
        idf = np.asarray(idf, dtype=np.float64)
        if idf.ndim != 1:
            raise ValueError(f"idf must be a vector, got shape {idf.shape}")
        if vocab and max(vocab.values()) >= len(idf):
            raise ValueError(f"vocabulary has column {max(vocab.values())} but idf has only {len(idf)} entries")
        self.idf = idf
        self.vocab = vocab

    def transform(self, texts: Sequence[str]) -> np.ndarray:
        """One L2-normalised row per text (all zeros when no word of the text is in the vocabulary)."""
        out = np.zeros((len(texts), len(self.idf)))
        for row, text in enumerate(texts):
            counts = Counter(t for t in TOKEN_PATTERN.findall(text.lower()) if t in self.vocab)
            for term, count in counts.items():
                out[row, self.vocab[term]] = count * self.idf[self.vocab[term]]
            norm = np.linalg.norm(out[row])
            if norm > 0:
                out[row] /= norm
        return out


def tfidf_similarity(text_a: str, text_b: str, vec) -> float:
    """Cosine similarity of the tf-idf vectors of two texts (0.0 when either has no known word).

    ``vec`` is a ``TfidfVectors`` or any object whose ``transform`` returns an array or a sparse matrix
    (e.g. a fitted scikit-learn ``TfidfVectorizer``).
    """
    encs = vec.transform([text_a, text_b])
    encs = np.asarray(encs.toarray() if hasattr(encs, "toarray") else encs, dtype=np.float64)
    norm_a, norm_b = np.linalg.norm(encs[0]), np.linalg.norm(encs[1])
    if norm_a == 0 or norm_b == 0:
        return 0.0
    return float(encs[0] @ encs[1] / norm_a / norm_b)


def load_tfidf_vectors(data_dir: Optional[Union[str, os.PathLike]] = None) -> Optional[TfidfVectors]:
    """The stored tf-idf statistics from the data folders, or None if either file is missing."""
    idf_path, vocab_path = locate_data_file(IDF_FILE, data_dir), locate_data_file(VOCAB_FILE, data_dir)
    if idf_path is None or vocab_path is None:
        LOG.info("tf-idf statistics not found (%s: %s, %s: %s)", IDF_FILE, idf_path, VOCAB_FILE, vocab_path)
        return None
    return _read_vectors(idf_path, vocab_path)


def fit_tfidf_vectors(documents: Iterable[str]) -> TfidfVectors:
    """IDF weights and vocabulary of ``documents`` as scikit-learn's default ``TfidfVectorizer().fit`` gives
    them (ROME's ``collect_stats``, kmeng01/memit dsets/tfidf_stats.py lines 43-74): smoothed
    ``idf = ln((1 + n) / (1 + df)) + 1`` and the terms numbered in sorted order."""
    document_frequency: Counter = Counter()
    n_documents = 0
    for document in documents:
        document_frequency.update(set(TOKEN_PATTERN.findall(document.lower())))
        n_documents += 1
    if not document_frequency:
        raise ValueError(f"no words in the {n_documents} documents; cannot fit tf-idf statistics")
    terms = sorted(document_frequency)
    df = np.array([document_frequency[t] for t in terms], dtype=np.float64)
    idf = np.log((1 + n_documents) / (1 + df)) + 1
    return TfidfVectors(idf, {term: i for i, term in enumerate(terms)})


def save_tfidf_vectors(vectors: TfidfVectors, folder: Union[str, os.PathLike]) -> None:
    """``idf.npy`` and ``tfidf_vocab.json`` in ``folder``, each written atomically."""
    folder = Path(folder)

    def write_idf(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, vectors.idf)

    atomic_write(folder / IDF_FILE, write_idf)
    atomic_write_json(folder / VOCAB_FILE, vectors.vocab)


def _read_vectors(idf_path: Path, vocab_path: Path) -> TfidfVectors:
    with open(vocab_path) as f:
        vocab = json.load(f)
    return TfidfVectors(np.load(idf_path), vocab)


def cached_tfidf_vectors(
    folder: Union[str, os.PathLike], fingerprint: Dict, documents: Callable[[], Iterable[str]]
) -> TfidfVectors:
    """Statistics stored in ``folder`` when they were fitted on inputs with this ``fingerprint``; otherwise
    fitted on ``documents()`` and stored, the fingerprint last, so a half-written cache is never reused."""
    folder = Path(folder)
    meta_path, idf_path, vocab_path = folder / CACHE_META_FILE, folder / IDF_FILE, folder / VOCAB_FILE
    if meta_path.is_file() and idf_path.is_file() and vocab_path.is_file():
        with open(meta_path) as f:
            stored = json.load(f)
        if stored.get("fingerprint") == fingerprint:
            LOG.info("tf-idf statistics from the cache %s", folder)
            return _read_vectors(idf_path, vocab_path)
        LOG.info("tf-idf cache %s was fitted on other inputs; fitting again", folder)
    vectors = fit_tfidf_vectors(documents())
    save_tfidf_vectors(vectors, folder)
    atomic_write_json(meta_path, {"fingerprint": fingerprint, "n_terms": len(vectors.vocab)}, indent=2)
    LOG.info("fitted tf-idf statistics (%d terms) into %s", len(vectors.vocab), folder)
    return vectors
