"""CounterFact and zsRE metrics: hand-checked numbers on tiny models, fluency, consistency, and the pre-edit
behaviour of the embedded model on real CounterFact records."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import experiments.eval_counterfact as eval_cf
import experiments.eval_zsre as eval_zsre
from dsets import (
    AttributeSnippets,
    CounterFactDataset,
    TfidfVectors,
    consistency_unavailable_reason,
    load_attribute_snippets,
    load_consistency_resources,
    load_tfidf_vectors,
    tfidf_similarity,
)
from experiments.eval_counterfact import compute_n_gram_entropy, compute_rewrite_quality_counterfact, n_gram_entropy
from experiments.eval_zsre import compute_rewrite_quality_zsre

RECORD = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P17", "subject": "Paris",
                          "target_new": {"str": "France", "id": "Q142"}, "target_true": {"str": "Italy", "id": "Q38"}},
    "paraphrase_prompts": ["The city of Paris lies in", "Paris, the capital of"],
    "neighborhood_prompts": ["Rome is located in"],
    "attribute_prompts": [],
    "generation_prompts": ["Paris is known for", "Paris is known for", "The people of Paris"],
}


@pytest.fixture(autouse=True)
def one_thread():
    """These small forward passes run much faster with one thread on a shared 2-core machine (two busy
    processes with two threads each made them up to 30x slower); the previous setting is restored."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _manual_scores(model, tok, prefix, target):
    """Mean NLL and all-tokens-top-1 of ``target`` after ``prefix``, one sequence, no padding."""
    p = tok(prefix)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0]
    log_probs = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + len(t)].double(), -1)
    nll = -log_probs[torch.arange(len(t)), torch.tensor(t)].mean().item()
    top1 = (log_probs.argmax(-1) == torch.tensor(t)).tolist()
    return nll, top1


def _counting(monkeypatch, module):
    calls = []
    real = module.continuation_scores

    def wrapper(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "continuation_scores", wrapper)
    return calls


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_gpt2", "tiny_tok"), ("tiny_llama", "tiny_tok_bos")])
def test_counterfact_nlls_match_hand_computed_log_softmax(request, monkeypatch, model_fixture, tok_fixture):
    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    calls = _counting(monkeypatch, eval_cf)
    out = compute_rewrite_quality_counterfact(model, tok, RECORD, skip_generation=True)
    assert len(calls) == 1 and len(calls[0]) == 2 * 4  # one batched call: 4 prompts x 2 targets
    assert set(out) == {f"{k}_{m}" for k in eval_cf.PROMPT_KINDS for m in ("probs", "correct")}
    assert [len(out[f"{k}_probs"]) for k in eval_cf.PROMPT_KINDS] == [1, 2, 1]

    new_nll, new_top1 = _manual_scores(model, tok, "Paris is located in", "France")
    true_nll, _ = _manual_scores(model, tok, "Paris is located in", "Italy")
    assert out["rewrite_prompts_probs"][0]["target_new"] == pytest.approx(new_nll, abs=1e-4)
    assert out["rewrite_prompts_probs"][0]["target_true"] == pytest.approx(true_nll, abs=1e-4)
    assert out["rewrite_prompts_correct"] == [all(new_top1)]
    neigh_true, neigh_top1 = _manual_scores(model, tok, "Rome is located in", "Italy")
    assert out["neighborhood_prompts_probs"][0]["target_true"] == pytest.approx(neigh_true, abs=1e-4)
    assert out["neighborhood_prompts_correct"] == [all(neigh_top1)]
    para_new, _ = _manual_scores(model, tok, "Paris, the capital of", "France")
    assert out["paraphrase_prompts_probs"][1]["target_new"] == pytest.approx(para_new, abs=1e-4)
    # a random 1000-token model: NLLs are near ln(1000), not zero or identical for both targets
    assert 4 < new_nll < 10 and new_nll != true_nll


def test_zsre_token_correctness_matches_argmax(tiny_gpt2, tiny_tok, monkeypatch):
    record = {
        "case_id": 0,
        "requested_rewrite": {"prompt": "Which family does {} belong to?", "subject": "Ramalinaceae",
                              "target_new": {"str": "Lecanorales"}, "target_true": {"str": "Ramalinales"}},
        "paraphrase_prompts": ["What family are Ramalinaceae?"],
        "neighborhood_prompts": [{"prompt": "nq question: who sang nice day for a white wedding?", "target": "Billy Idol"}],
    }
    calls = _counting(monkeypatch, eval_zsre)
    out = compute_rewrite_quality_zsre(tiny_gpt2, tiny_tok, record)
    assert len(calls) == 1 and len(calls[0]) == 3
    n_new = len(tiny_tok(" Lecanorales")["input_ids"])
    n_loc = len(tiny_tok(" Billy Idol")["input_ids"])
    assert [len(x) for x in out["rewrite_prompts_correct"]] == [n_new]
    assert [len(x) for x in out["paraphrase_prompts_correct"]] == [n_new]
    assert [len(x) for x in out["neighborhood_prompts_correct"]] == [n_loc]
    assert out["rewrite_prompts_correct"][0] == _manual_scores(tiny_gpt2, tiny_tok, "Which family does Ramalinaceae belong to?", "Lecanorales")[1]
    assert out["neighborhood_prompts_correct"][0] == _manual_scores(tiny_gpt2, tiny_tok, record["neighborhood_prompts"][0]["prompt"], "Billy Idol")[1]


# ---------------------------------------------------------------- fluency

def test_n_gram_entropy_hand_computed():
    # "the cat the cat the": bigrams (the,cat) x2, (cat,the) x2 -> 1 bit; trigrams 2:1 -> H(2/3, 1/3)
    h3 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * 1.0 + 4 / 3 * h3) / 2
    assert compute_n_gram_entropy("the cat the cat the") == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.945531, abs=1e-6)
    assert compute_n_gram_entropy("hello") == 0.0
    assert n_gram_entropy(["the cat the cat the", "hello"]) == pytest.approx(expected / 2)


def test_repetitive_text_has_lower_entropy_than_varied_text():
    repetitive = "Paris is a city. " * 12
    varied = ("Paris is the capital of France, famous for the Louvre, cafes along the Seine, "
              "its bakeries, fashion houses, and a tower built for the 1889 world fair by Gustave Eiffel.")
    assert compute_n_gram_entropy(repetitive) < 3.0 < compute_n_gram_entropy(varied)


# ---------------------------------------------------------------- generation and consistency

def test_generation_metrics_without_consistency_files(tiny_gpt2, tiny_tok, tmp_path, monkeypatch):
    monkeypatch.delenv("ECE_DATA_DIR", raising=False)
    monkeypatch.setattr("dsets.data_files._globals_data_dir", lambda: tmp_path / "none")
    assert load_attribute_snippets(tmp_path) is None and load_tfidf_vectors(tmp_path) is None
    assert load_consistency_resources(tmp_path) == (None, None)
    reason = consistency_unavailable_reason(tmp_path)
    assert "attribute_snippets.json" in reason and "idf.npy" in reason and str(tmp_path) in reason

    out = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, max_new_tokens=4, consistency_unavailable=reason)
    assert out["reference_score"] is None and out["consistency_unavailable"] == reason
    assert len(out["text"]) == 3 and all(t.startswith(p) for t, p in zip(out["text"], RECORD["generation_prompts"]))
    assert out["text"][0] == out["text"][1]  # greedy: the same prompt gives the same text
    assert out["ngram_entropy"] == pytest.approx(n_gram_entropy(out["text"]))
    plain = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, max_new_tokens=4)
    assert plain["reference_score"] is None and "not provided" in plain["consistency_unavailable"]
    assert "text" not in compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, skip_generation=True)


def test_tfidf_vectors_match_sklearn():
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = ["Paris is in France", "Rome is the capital of Italy", "The Louvre is in Paris, France."]
    sk = TfidfVectorizer().fit(docs)
    ours = TfidfVectors(sk.idf_, {k: int(v) for k, v in sk.vocabulary_.items()})
    texts = ["Paris Paris France and the Louvre", "nothing known here zz"]
    np.testing.assert_allclose(ours.transform(texts), sk.transform(texts).toarray(), atol=1e-12)
    assert tfidf_similarity(texts[0], docs[2], ours) == pytest.approx(tfidf_similarity(texts[0], docs[2], sk))
    assert tfidf_similarity(texts[1], docs[0], ours) == 0.0


def test_reference_score_with_snippet_files(tiny_gpt2, tiny_tok, tmp_path):
    from sklearn.feature_extraction.text import TfidfVectorizer

    snippets = [{"relation_id": "P17", "target_id": "Q142",
                 "samples": [{"name": "Lyon", "text": "Lyon is a city in France."},
                             {"name": "Nice", "text": "Nice is on the French Riviera in France."}]}]
    (tmp_path / "attribute_snippets.json").write_text(json.dumps(snippets))
    sk = TfidfVectorizer().fit(["Lyon is a city in France.", "Paris is known for art", "Rome is in Italy"])
    np.save(tmp_path / "idf.npy", sk.idf_)
    (tmp_path / "tfidf_vocab.json").write_text(json.dumps({k: int(v) for k, v in sk.vocabulary_.items()}))
    snips, vec = load_consistency_resources(tmp_path)
    assert isinstance(snips, AttributeSnippets) and isinstance(vec, TfidfVectors)
    assert consistency_unavailable_reason(tmp_path) is None
    assert snips.texts("P17", "Q142") == ["Lyon is a city in France.", "Nice is on the French Riviera in France."]

    out = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, snips=snips, vec=vec, max_new_tokens=4)
    expected = tfidf_similarity(" ".join(out["text"]), " ".join(snips.texts("P17", "Q142")), vec)
    assert "consistency_unavailable" not in out
    assert out["reference_score"] == pytest.approx(expected)
    assert 0 < out["reference_score"] < 1  # the prompts share "is" with the snippets
    other = dict(RECORD, requested_rewrite=dict(RECORD["requested_rewrite"], target_new={"str": "Spain", "id": "Q29"}))
    missing = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, other, snips=snips, vec=vec, max_new_tokens=2)
    assert missing["reference_score"] is None and "Q29" in missing["consistency_unavailable"]


# ---------------------------------------------------------------- embedded model, real records

def test_embedded_model_prefers_true_targets_before_editing(embedded_model_and_tok, data_dir):
    model, tok = embedded_model_and_tok
    records = CounterFactDataset(data_dir, size=10)
    margins, correct = [], []
    for record in records:
        rewrite_only = dict(record, paraphrase_prompts=[], neighborhood_prompts=[])
        out = compute_rewrite_quality_counterfact(model, tok, rewrite_only, skip_generation=True)
        probs = out["rewrite_prompts_probs"][0]
        margins.append(probs["target_new"] - probs["target_true"])
        correct += out["rewrite_prompts_correct"]
    # measured (SmolLM2-135M-Instruct, Q4_1 dequantised): 7 of 10 positive, mean margin 1.25 nats
    assert sum(m > 0 for m in margins) >= 6
    assert np.mean(margins) > 0.5
    assert not any(correct)  # before editing, no counterfactual target is the top-1 continuation
    # well-known facts: "Porsche 911, created by" Porsche (vs Honda), Gilad Atzmon's language Hebrew (vs Italian)
    assert margins[1] > 2 and margins[4] > 2

    full = compute_rewrite_quality_counterfact(model, tok, records[1], skip_generation=True)
    assert len(full["paraphrase_prompts_probs"]) == 2 and len(full["neighborhood_prompts_probs"]) == 10
    assert all(p["target_new"] - p["target_true"] > 1 for p in full["paraphrase_prompts_probs"])
    assert all(p["target_new"] - p["target_true"] > 1 for p in full["neighborhood_prompts_probs"])
    # measured: 4 of the 10 neighbourhood prompts continue with " Porsche" (target_true) as top-1 tokens
    assert sum(full["neighborhood_prompts_correct"]) >= 2 and not any(full["paraphrase_prompts_correct"])
