"""TF-IDF statistics (``idf.npy`` + ``tfidf_vocab.json``) for the CounterFact consistency metric.

``TfidfVectors`` reproduces what ROME/MEMIT get from scikit-learn's ``TfidfVectorizer`` with default settings
and the stored idf vector: lower-cased tokens matching ``(?u)\\b\\w\\w+\\b``, raw term counts times idf,
rows scaled to unit L2 norm. It is plain numpy, so no private scikit-learn attributes are touched.
The statistics are looked up like data files but never downloaded here; ``load_tfidf_vectors`` returns None
when they are missing.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from typing import Dict, Optional, Sequence, Union

import numpy as np

from dsets.data_files import locate_data_file

LOG = logging.getLogger(__name__)

IDF_FILE = "idf.npy"
VOCAB_FILE = "tfidf_vocab.json"
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
    with open(vocab_path) as f:
        vocab = json.load(f)
    return TfidfVectors(np.load(idf_path), vocab)
