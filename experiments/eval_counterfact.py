"""CounterFact metrics of one record, in MEMIT's result format (DESIGN.md section 7).

``compute_rewrite_quality_counterfact`` returns::

    rewrite_prompts_probs       [{"target_new": mean NLL, "target_true": mean NLL}]  (one per prompt;
    paraphrase_prompts_probs    [...]                                              lower = more likely)
    neighborhood_prompts_probs  [...]
    rewrite_prompts_correct     [bool]   every target_new token is the top-1 prediction (teacher forcing)
    paraphrase_prompts_correct  [bool]   same, target_new
    neighborhood_prompts_correct [bool]  same, target_true
    # unless skip_generation:
    text                        greedy generations from generation_prompts (prompt + continuation)
    ngram_entropy               fluency: mean over texts of MEMIT's weighted bi/tri-gram entropy (bits)
    ngram_tokenizer             which word tokenizer the entropy used
    reference_score             consistency: tf-idf cosine of the generations and the attribute snippets
                                of (relation, target_new), or None with
    consistency_unavailable     why it could not be computed (missing snippets / tf-idf files)

MEMIT sampled its generations (top-k 5, 100 tokens in all); DESIGN.md asks for greedy ones, the default
here. Pass ``do_sample=True, top_k=5`` to sample like MEMIT. MEMIT's ``essence_score`` is not computed.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from typing import Dict, List, Optional, Sequence

from dsets.tfidf_stats import tfidf_similarity
from util.generate import generate_texts
from util.scoring import continuation_scores

LOG = logging.getLogger(__name__)

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
PROMPT_KINDS = ("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts")
NO_CONSISTENCY_FILES = (
    "attribute snippets and tf-idf statistics were not provided (attribute_snippets.json, idf.npy and "
    "tfidf_vocab.json are needed and are not downloaded automatically)"
)


@functools.lru_cache(maxsize=None)
def _punkt_available() -> bool:
    try:
        import nltk

        nltk.data.find("tokenizers/punkt_tab/english/")
        return True
    except (ImportError, LookupError):
        return False


def word_tokenize(text: str) -> List[str]:
    """Words for n-gram counting: ``nltk.word_tokenize`` (MEMIT's) when its punkt data is installed;
    otherwise the same word tokenizer (nltk's Treebank-style ``NLTKWordTokenizer``) applied to sentences
    split at ``.!?`` followed by white space."""
    if _punkt_available():
        import nltk

        return nltk.word_tokenize(text)
    from nltk.tokenize import NLTKWordTokenizer

    tokenizer = NLTKWordTokenizer()
    return [w for sentence in re.split(r"(?<=[.!?])\s+", text) if sentence for w in tokenizer.tokenize(sentence)]


def ngram_tokenizer_name() -> str:
    return "nltk.word_tokenize" if _punkt_available() else "regex sentences + nltk.NLTKWordTokenizer"


def compute_n_gram_entropy(text: str, ns: Sequence[int] = NGRAM_ORDERS, weights: Sequence[float] = NGRAM_WEIGHTS) -> float:
    """Mean over ``n`` of ``weight_n * H_n`` with ``H_n`` the entropy (bits) of the text's n-gram counts.

    A text with fewer than ``n`` words contributes ``H_n = 0``.
    """
    words = word_tokenize(text)
    weighted = []
    for n, weight in zip(ns, weights):
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(counts.values())
        entropy = -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0
        weighted.append(weight * entropy)
    return sum(weighted) / len(weighted)


def n_gram_entropy(texts: Sequence[str]) -> float:
    """Fluency: the arithmetic mean of ``compute_n_gram_entropy`` over texts."""
    if not texts:
        raise ValueError("n_gram_entropy needs at least one text")
    return sum(compute_n_gram_entropy(t) for t in texts) / len(texts)


def _snippet_texts(snips, relation_id, target_id) -> List[str]:
    try:
        samples = snips[relation_id][target_id]
    except (KeyError, TypeError):
        samples = []
    return [sample["text"] for sample in samples]


def _generate(model, tok, prompts: List[str], max_new_tokens: int, do_sample: bool, top_k, seed) -> List[str]:
    """Generations for each prompt; greedy decoding runs each distinct prompt once."""
    if do_sample:
        return generate_texts(model, tok, prompts, max_new_tokens, do_sample=True, top_k=top_k, seed=seed)
    unique = list(dict.fromkeys(prompts))
    by_prompt = dict(zip(unique, generate_texts(model, tok, unique, max_new_tokens)))
    return [by_prompt[p] for p in prompts]


def compute_rewrite_quality_counterfact(
    model,
    tok,
    record: Dict,
    snips=None,
    vec=None,
    skip_generation: bool = False,
    max_new_tokens: int = 50,
    do_sample: bool = False,
    top_k: Optional[int] = None,
    seed: Optional[int] = None,
    consistency_unavailable: Optional[str] = None,
    batch_size: int = 32,
) -> Dict:
    """Probabilities (and unless ``skip_generation``, generation metrics) of one CounterFact record.

    All prompts and both targets are scored in one batched ``continuation_scores`` call.
    ``consistency_unavailable`` is the reason stored when ``snips``/``vec`` are None (a default is used).
    """
    rewrite = record["requested_rewrite"]
    target_new, target_true = rewrite["target_new"]["str"], rewrite["target_true"]["str"]
    prompts = {
        "rewrite_prompts": [rewrite["prompt"].format(rewrite["subject"])],
        "paraphrase_prompts": list(record.get("paraphrase_prompts", [])),
        "neighborhood_prompts": list(record.get("neighborhood_prompts", [])),
    }
    flat = [p for kind in PROMPT_KINDS for p in prompts[kind]]
    scores = continuation_scores(
        model, tok, [p for p in flat for _ in (0, 1)], [t for _ in flat for t in (target_new, target_true)],
        batch_size=batch_size,
    )
    ret: Dict = {}
    start = 0
    for kind in PROMPT_KINDS:
        pairs = [(scores[2 * i], scores[2 * i + 1]) for i in range(start, start + len(prompts[kind]))]
        start += len(prompts[kind])
        ret[f"{kind}_probs"] = [{"target_new": new.mean_nll, "target_true": true.mean_nll} for new, true in pairs]
        wanted = 1 if kind == "neighborhood_prompts" else 0
        ret[f"{kind}_correct"] = [all(pair[wanted].token_correct) for pair in pairs]

    if skip_generation:
        return ret
    generation_prompts = list(record.get("generation_prompts", []))
    texts = _generate(model, tok, generation_prompts, max_new_tokens, do_sample, top_k, seed) if generation_prompts else []
    ret["text"] = texts
    ret["ngram_entropy"] = n_gram_entropy(texts) if texts else None
    ret["ngram_tokenizer"] = ngram_tokenizer_name()

    reason = None
    if snips is None or vec is None:
        reason = consistency_unavailable or NO_CONSISTENCY_FILES
    elif not texts:
        reason = "the record has no generation_prompts"
    else:
        references = _snippet_texts(snips, rewrite.get("relation_id"), rewrite["target_new"].get("id"))
        if not references:
            reason = (f"no attribute snippets for relation {rewrite.get('relation_id')!r} and object "
                      f"{rewrite['target_new'].get('id')!r}")
        else:
            ret["reference_score"] = tfidf_similarity(" ".join(texts), " ".join(references), vec)
    if reason is not None:
        ret["reference_score"] = None
        ret["consistency_unavailable"] = reason
    return ret
