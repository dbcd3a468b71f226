"""CounterFact metrics of one record, in MEMIT's result format (docs/DESIGN.md section 7).

``compute_rewrite_quality_counterfact`` returns::

    rewrite_prompts_probs       [{"target_new": mean NLL, "target_true": mean NLL}]  (one per prompt;
    paraphrase_prompts_probs    [...]                                              lower = more likely)
    neighborhood_prompts_probs  [...]
    rewrite_prompts_correct     [bool]   every target_new token is the top-1 prediction (teacher forcing)
    paraphrase_prompts_correct  [bool]   same, target_new
    neighborhood_prompts_correct [bool]  same, target_true
    # unless free_generation is None (experiments/free_generation.py):
    rewrite_prompts_generated_correct       [bool]  the greedy answer begins with target_new and does not
    paraphrase_prompts_generated_correct    [bool]  name target_true after it
    neighborhood_prompts_generated_correct  [bool]  ... begins with target_true, no target_new after it
    *_prompts_generated_text                [str]   those answers (at most target tokens + 10)
    free_generation                         how they were decoded and judged (FreeGeneration.to_dict)
    # unless skip_generation:
    text                        generations from generation_prompts (prompt + continuation)
    generation_protocol         how they were generated (GenerationProtocol.to_dict)
    ngram_entropy               fluency: mean over texts of MEMIT's weighted bi/tri-gram entropy (bits)
    ngram_tokenizer             which word tokenizer the entropy used
    reference_score             consistency: tf-idf cosine of the generations and the reference texts of
                                (relation, target_new), or None with
    consistency_unavailable     why it could not be computed
    consistency_source          which references and statistics the score used (published or substitute)

The default generation protocol is MEMIT's published one (``test_generation`` in kmeng01/memit
experiments/py/eval_utils_counterfact.py lines 186-217): top-k 5 sampling, 100 tokens including the prompt,
one text per generation prompt; each prompt is seeded from the run seed, the case id and its position, so
reruns and resumed runs give the same texts. ``greedy`` (argmax, 50 new tokens) is kept as an option; its
fluency numbers are not comparable with the published tables. MEMIT's ``essence_score`` is not computed.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from dsets.attr_snippets import snippet_key
from dsets.tfidf_stats import tfidf_similarity
from experiments.free_generation import FreeGeneration, answer_budget, judged_answers
from util.generate import generate_texts, generation_seed, sample_top_k_texts, score_and_answer

LOG = logging.getLogger(__name__)

NGRAM_ORDERS = (2, 3)
NGRAM_WEIGHTS = (2 / 3, 4 / 3)
PROMPT_KINDS = ("rewrite_prompts", "paraphrase_prompts", "neighborhood_prompts")
PUBLISHED = "published"
GREEDY = "greedy"
GENERATION_PROTOCOLS = (PUBLISHED, GREEDY)
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


@dataclass(frozen=True)
class GenerationProtocol:
    """How the fluency/consistency texts are generated; ``to_dict`` is stored with every case's metrics.

    ``published``: top-k sampling with ``top_k`` and ``max_out_len`` tokens per text including the prompt
    (MEMIT: 5 and 100), seeded per prompt from ``seed``. ``greedy``: argmax decoding of ``max_new_tokens``
    new tokens (this project's earlier default, 50), stopping at the end-of-text token.
    """

    name: str = PUBLISHED
    seed: int = 0
    top_k: int = 5
    max_out_len: int = 100
    max_new_tokens: int = 50
    batch_size: int = 256  # texts sampled together; changes no text beyond rounding, so not in to_dict

    def __post_init__(self):
        if self.name not in GENERATION_PROTOCOLS:
            raise ValueError(f"unknown generation protocol {self.name!r}; use one of {', '.join(GENERATION_PROTOCOLS)}")

    def to_dict(self) -> Dict:
        if self.name == GREEDY:
            return {"name": GREEDY, "decoding": "greedy (argmax)", "max_new_tokens": self.max_new_tokens,
                    "length_includes_prompt": False, "stops_at_eos": True}
        return {"name": PUBLISHED, "decoding": "top-k sampling", "top_k": self.top_k, "max_out_len": self.max_out_len,
                "length_includes_prompt": True, "n_gen_per_prompt": 1, "stops_at_eos": False, "seed": self.seed,
                "seeding": "one torch.Generator per prompt, seeded from sha256(seed:case_id:prompt index)",
                "reference": "MEMIT util/generate.py generate_fast, eval_utils_counterfact.py test_generation"}

    def generate(self, model, tok, prompts: List[str], case_id) -> List[str]:
        """Texts for one case's prompts."""
        return self.generate_many(model, tok, [(prompts, case_id)])[0]

    def generate_many(self, model, tok, cases: Sequence[Tuple[List[str], object]]) -> List[List[str]]:
        """Texts for the prompts of several cases (``(prompts, case_id)`` each), decoded in shared batches.

        A sampled text depends on its prompt and seed only (``sample_top_k_ids``), so batching the prompts of
        many cases together changes no text beyond rounding, and is several times faster than one case at a
        time (two prompts per EasyEdit record would otherwise fill batches of two). Greedy decoding runs each
        distinct prompt once."""
        flat = [(prompt, case_id, i) for prompts, case_id in cases for i, prompt in enumerate(prompts)]
        if self.name == PUBLISHED:
            order = sorted(range(len(flat)), key=lambda j: len(flat[j][0]))  # similar lengths: little padding
            texts = sample_top_k_texts(model, tok, [flat[j][0] for j in order],
                                       [generation_seed(self.seed, flat[j][1], flat[j][2]) for j in order],
                                       max_out_len=self.max_out_len, top_k=self.top_k, batch_size=self.batch_size)
            by_position = dict(zip(order, texts))
            flat_texts = [by_position[j] for j in range(len(flat))]
        else:
            unique = list(dict.fromkeys(prompt for prompt, _, _ in flat))
            by_prompt = dict(zip(unique, generate_texts(model, tok, unique, self.max_new_tokens)))
            flat_texts = [by_prompt[prompt] for prompt, _, _ in flat]
        out, start = [], 0
        for prompts, _ in cases:
            out.append(flat_texts[start : start + len(prompts)])
            start += len(prompts)
        return out


def compute_rewrite_quality_counterfact(
    model,
    tok,
    record: Dict,
    snips=None,
    vec=None,
    skip_generation: bool = False,
    generation_protocol: GenerationProtocol = GenerationProtocol(),
    consistency_source: Optional[str] = None,
    consistency_unavailable: Optional[str] = None,
    batch_size: int = 64,
    free_generation: Optional[FreeGeneration] = FreeGeneration(),
) -> Dict:
    """Probabilities, the free-generation metric (unless ``free_generation`` is None) and, unless
    ``skip_generation``, the fluency/consistency metrics of one CounterFact record.

    ``consistency_source`` labels the references and statistics in ``snips``/``vec`` (published or
    substitute); ``consistency_unavailable`` is the reason stored when they are None (a default is used).
    """
    return compute_rewrite_quality_counterfact_many(
        model, tok, [record], snips, vec, [skip_generation], generation_protocol, consistency_source,
        consistency_unavailable, batch_size, free_generation,
    )[0]


def _prompts(record: Dict) -> Dict[str, List[str]]:
    rewrite = record["requested_rewrite"]
    return {
        "rewrite_prompts": [rewrite["prompt"].format(rewrite["subject"])],
        "paraphrase_prompts": list(record.get("paraphrase_prompts", [])),
        "neighborhood_prompts": list(record.get("neighborhood_prompts", [])),
    }


def _targets(record: Dict) -> tuple:
    rewrite = record["requested_rewrite"]
    return rewrite["target_new"]["str"], rewrite["target_true"]["str"]


def compute_rewrite_quality_counterfact_many(
    model,
    tok,
    records: Sequence[Dict],
    snips=None,
    vec=None,
    skip_generation: Sequence[bool] = (),
    generation_protocol: GenerationProtocol = GenerationProtocol(),
    consistency_source: Optional[str] = None,
    consistency_unavailable: Optional[str] = None,
    batch_size: int = 64,
    free_generation: Optional[FreeGeneration] = FreeGeneration(),
) -> List[Dict]:
    """``compute_rewrite_quality_counterfact`` of several records (``skip_generation``: one flag per record,
    default all False). The prompts of all records go through one ``score_and_answer`` call: each prompt runs
    once, both targets are scored after it and its greedy answer decoded from it, in shared batches of
    ``batch_size`` prompts (on a CPU a round of records costs a fraction of scoring them one by one)."""
    records = list(records)
    skip_generation = list(skip_generation) or [False] * len(records)
    if len(skip_generation) != len(records):
        raise ValueError(f"{len(records)} records but {len(skip_generation)} skip_generation flags")
    prompts, targets, budgets, groups_per_record = [], [], [], []
    for record in records:
        target_new, target_true = _targets(record)
        groups, prompts_of = {}, _prompts(record)
        for kind in PROMPT_KINDS:  # the order in which the outcomes are read back below
            kind_prompts = prompts_of[kind]
            expected, competing = (target_true, target_new) if kind == "neighborhood_prompts" else (target_new, target_true)
            groups[kind] = [(p, expected, competing) for p in kind_prompts]
            prompts += kind_prompts
            targets += [(target_new, target_true)] * len(kind_prompts)
            budget = 0 if free_generation is None else answer_budget(tok, expected, free_generation)
            budgets += [budget] * len(kind_prompts)
        groups_per_record.append(groups)
    outcomes = iter(score_and_answer(model, tok, prompts, targets, budgets, batch_size=batch_size))
    results: List[Dict] = []
    continuations = []
    for groups in groups_per_record:
        ret: Dict = {}
        for kind in PROMPT_KINDS:
            pairs = []
            for _ in groups[kind]:
                (new, true), answer = next(outcomes)
                pairs.append((new, true))
                continuations.append(answer)
            ret[f"{kind}_probs"] = [{"target_new": new.mean_nll, "target_true": true.mean_nll} for new, true in pairs]
            wanted = 1 if kind == "neighborhood_prompts" else 0
            ret[f"{kind}_correct"] = [all(pair[wanted].token_correct) for pair in pairs]
        results.append(ret)
    if free_generation is not None:
        for ret, free in zip(results, judged_answers(tok, groups_per_record, continuations, free_generation)):
            ret.update(free)
    due = [record for record, skip in zip(records, skip_generation) if not skip]
    generated = iter(generation_metrics_many(model, tok, due, snips, vec, generation_protocol, consistency_source,
                                             consistency_unavailable))
    for ret, skip in zip(results, skip_generation):
        if not skip:
            ret.update(next(generated))
    return results


def generation_metrics_many(model, tok, records: Sequence[Dict], snips=None, vec=None,
                            generation_protocol: GenerationProtocol = GenerationProtocol(),
                            consistency_source: Optional[str] = None,
                            consistency_unavailable: Optional[str] = None) -> List[Dict]:
    """Fluency and consistency of each record (MEMIT's ``test_generation``), all texts generated together."""
    texts_per_record = generation_protocol.generate_many(
        model, tok, [(list(record.get("generation_prompts", [])), record.get("case_id")) for record in records])
    return [_generation_metrics(record, texts, snips, vec, generation_protocol, consistency_source,
                                consistency_unavailable) for record, texts in zip(records, texts_per_record)]


def _generation_metrics(record: Dict, texts: List[str], snips, vec, generation_protocol: GenerationProtocol,
                        consistency_source: Optional[str], consistency_unavailable: Optional[str]) -> Dict:
    """Fluency and consistency of one record's generated texts."""
    ret: Dict = {"text": texts, "generation_protocol": generation_protocol.to_dict(),
                 "ngram_entropy": n_gram_entropy(texts) if texts else None, "ngram_tokenizer": ngram_tokenizer_name()}
    if "generation_prompts_source" in record:
        ret["generation_prompts_source"] = record["generation_prompts_source"]

    reason = None
    if snips is None or vec is None:
        reason = consistency_unavailable or NO_CONSISTENCY_FILES
    elif not texts:
        reason = "the record has no generation_prompts"
    else:
        relation_id, target_id = snippet_key(record["requested_rewrite"])
        references = _snippet_texts(snips, relation_id, target_id)
        if not references:
            reason = f"no attribute snippets for relation {relation_id!r} and object {target_id!r}"
        else:
            ret["reference_score"] = tfidf_similarity(" ".join(texts), " ".join(references), vec)
            ret["consistency_source"] = consistency_source or "unknown (the caller gave no source)"
    if reason is not None:
        ret["reference_score"] = None
        ret["consistency_unavailable"] = reason
    return ret
