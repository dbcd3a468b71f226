"""CounterFact and zsRE metrics: hand-checked numbers on tiny models, fluency, consistency, the generation
protocols (MEMIT's published top-k sampling and greedy), the free-generation metric (on a scripted model where
it must differ from teacher forcing, and on tiny models), the tf-idf substitute, and the pre-edit behaviour of
the embedded model on real CounterFact records."""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import experiments.eval_counterfact as eval_cf
import experiments.eval_zsre as eval_zsre
import dsets.tfidf_stats as tfidf_stats
from dsets import (
    PUBLISHED_SOURCE,
    SUBSTITUTE_SOURCE,
    AttributeSnippets,
    CounterFactDataset,
    TfidfVectors,
    consistency_resources,
    consistency_unavailable_reason,
    counterfact_reference_entries,
    fit_tfidf_vectors,
    load_attribute_snippets,
    load_tfidf_vectors,
    tfidf_similarity,
)
from experiments.eval_counterfact import (
    GREEDY,
    PUBLISHED,
    GenerationProtocol,
    compute_n_gram_entropy,
    compute_rewrite_quality_counterfact,
    n_gram_entropy,
)
from experiments.eval_zsre import compute_rewrite_quality_zsre
from experiments.free_generation import FreeGeneration, answer_correct, answer_text
from util.generate import (_cache_of, _forward_kwargs, generation_seed, reserve_room, roomy_layer_class,
                           sample_top_k_ids, sample_top_k_texts)
from util.scoring import continuation_scores

RECORD = {
    "case_id": 0,
    "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P17", "subject": "Paris",
                          "target_new": {"str": "France", "id": "Q142"}, "target_true": {"str": "Italy", "id": "Q38"}},
    "paraphrase_prompts": ["The city of Paris lies in", "Paris, the capital of"],
    "neighborhood_prompts": ["Rome is located in"],
    "attribute_prompts": [],
    "generation_prompts": ["Paris is known for", "Paris is known for", "The people of Paris"],
}
GREEDY_4 = GenerationProtocol(GREEDY, max_new_tokens=4)
SHORT_PUBLISHED = GenerationProtocol(PUBLISHED, max_out_len=12)


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
    real = module.score_and_answer

    def wrapper(*args, **kwargs):
        calls.append(list(zip(args[2], args[3])))  # (prompt, its targets)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "score_and_answer", wrapper)
    return calls


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_gpt2", "tiny_tok"), ("tiny_llama", "tiny_tok_bos")])
def test_counterfact_nlls_match_hand_computed_log_softmax(request, monkeypatch, model_fixture, tok_fixture):
    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    calls = _counting(monkeypatch, eval_cf)
    out = compute_rewrite_quality_counterfact(model, tok, RECORD, skip_generation=True)
    assert len(calls) == 1 and [len(targets) for _, targets in calls[0]] == [2] * 4  # one call: 4 prompts x 2 targets
    assert set(out) == {f"{k}_{m}" for k in eval_cf.PROMPT_KINDS
                        for m in ("probs", "correct", "generated_correct", "generated_text")} | {"free_generation"}
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
    assert len(calls) == 1 and [len(targets) for _, targets in calls[0]] == [1] * 3
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
    nothing = consistency_resources(tmp_path)  # neither the published files nor the substitute's inputs
    assert (nothing.snippets, nothing.vectors, nothing.source) == (None, None, None)
    reason = consistency_unavailable_reason(tmp_path)
    assert "attribute_snippets.json" in reason and "idf.npy" in reason and str(tmp_path) in reason

    out = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, generation_protocol=GREEDY_4,
                                              consistency_unavailable=reason)
    assert out["reference_score"] is None and out["consistency_unavailable"] == reason
    assert "consistency_source" not in out
    assert len(out["text"]) == 3 and all(t.startswith(p) for t, p in zip(out["text"], RECORD["generation_prompts"]))
    assert out["text"][0] == out["text"][1]  # greedy: the same prompt gives the same text
    assert out["ngram_entropy"] == pytest.approx(n_gram_entropy(out["text"]))
    plain = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, generation_protocol=SHORT_PUBLISHED)
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
    resources = consistency_resources(tmp_path)
    snips, vec = resources.snippets, resources.vectors
    assert isinstance(snips, AttributeSnippets) and isinstance(vec, TfidfVectors)
    assert consistency_unavailable_reason(tmp_path) is None
    assert snips.texts("P17", "Q142") == ["Lyon is a city in France.", "Nice is on the French Riviera in France."]

    out = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD, snips=snips, vec=vec,
                                              generation_protocol=GREEDY_4, consistency_source=PUBLISHED_SOURCE)
    expected = tfidf_similarity(" ".join(out["text"]), " ".join(snips.texts("P17", "Q142")), vec)
    assert "consistency_unavailable" not in out and out["consistency_source"] == PUBLISHED_SOURCE
    assert consistency_resources(tmp_path).source == PUBLISHED_SOURCE  # the published files win
    assert out["reference_score"] == pytest.approx(expected)
    assert 0 < out["reference_score"] < 1  # the prompts share "is" with the snippets
    other = dict(RECORD, requested_rewrite=dict(RECORD["requested_rewrite"], target_new={"str": "Spain", "id": "Q29"}))
    missing = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, other, snips=snips, vec=vec,
                                                  generation_protocol=GREEDY_4)
    assert missing["reference_score"] is None and "Q29" in missing["consistency_unavailable"]


# ---------------------------------------------------------------- generation protocols


def _full_logits(model, ids):
    """Logits of one unpadded sequence, recomputed without a key/value cache."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double()


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_gpt2", "tiny_tok"), ("tiny_llama", "tiny_tok_bos")])
def test_published_sampling_stays_in_each_steps_top_5_and_fills_100_tokens(request, model_fixture, tok_fixture):
    """MEMIT generate_fast (kmeng01/memit util/generate.py lines 105-119): top-k 5 of every step, sequences of
    max_out_len=100 tokens counting the prompt (and the BOS token the Llama tokenizer adds)."""
    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    prompts = ["Paris is known for", "The people of Paris are famous for their", "Hi"]
    sequences = sample_top_k_ids(model, tok, prompts, seeds=[1, 2, 3], max_out_len=100, top_k=5)
    not_argmax = 0
    for prompt, ids in zip(prompts, sequences):
        prompt_len = len(tok(prompt)["input_ids"])
        assert len(ids) == 100 and ids[:prompt_len] == tok(prompt)["input_ids"]
        logits = _full_logits(model, ids)
        for position in range(prompt_len, 100):
            step = logits[position - 1]
            fifth = torch.topk(step, 5).values[-1]
            assert step[ids[position]] >= fifth - 1e-4, f"token {position} of {prompt!r} is outside the top 5"
            not_argmax += ids[position] != int(step.argmax())
    assert not_argmax > 50  # it samples: a random model's top 5 are near-uniform, so most draws are not the argmax
    assert sample_top_k_ids(model, tok, ["Hi"], seeds=[0], max_out_len=1)[0] == tok("Hi")["input_ids"]


def test_published_sampling_is_seeded_per_prompt(tiny_gpt2, tiny_tok):
    prompts = ["Paris is known for", "The people of Paris", "Paris is known for"]
    rng_before = torch.get_rng_state()
    first = sample_top_k_texts(tiny_gpt2, tiny_tok, prompts, seeds=[5, 6, 7], max_out_len=30)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global random state is left alone
    torch.manual_seed(123)
    again = sample_top_k_texts(tiny_gpt2, tiny_tok, prompts, seeds=[5, 6, 7], max_out_len=30, batch_size=1)
    assert again == first  # same seeds -> same texts, whatever the batch and the global seed
    assert sample_top_k_texts(tiny_gpt2, tiny_tok, prompts[1:2], seeds=[6], max_out_len=30) == first[1:2]
    other = sample_top_k_texts(tiny_gpt2, tiny_tok, prompts, seeds=[8, 9, 10], max_out_len=30)
    assert all(a != b for a, b in zip(first, other))
    assert first[0] != first[2]  # the same prompt with another seed is another draw (n_gen_per_prompt=1 each)
    assert all(text.startswith(prompt) for text, prompt in zip(first, prompts))
    assert generation_seed(0, 7, 1) == generation_seed(0, 7, 1) != generation_seed(1, 7, 1)
    assert len({generation_seed(0, case, i) for case in range(20) for i in range(10)}) == 200


def test_published_protocol_is_the_default_and_recorded(tiny_gpt2, tiny_tok):
    out = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD)
    protocol = out["generation_protocol"]
    assert protocol["name"] == PUBLISHED and protocol["decoding"] == "top-k sampling"
    assert (protocol["top_k"], protocol["max_out_len"], protocol["seed"]) == (5, 100, 0)
    assert protocol["length_includes_prompt"] is True and protocol["stops_at_eos"] is False
    assert out["text"][0] != out["text"][1]  # the duplicated prompt is sampled twice
    assert out["ngram_entropy"] == pytest.approx(n_gram_entropy(out["text"]))
    seeds = [generation_seed(0, RECORD["case_id"], i) for i in range(3)]
    assert out["text"] == sample_top_k_texts(tiny_gpt2, tiny_tok, RECORD["generation_prompts"], seeds)
    assert compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD)["text"] == out["text"]  # a rerun
    reseeded = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, RECORD,
                                                   generation_protocol=GenerationProtocol(PUBLISHED, seed=1))
    assert reseeded["text"] != out["text"] and reseeded["generation_protocol"]["seed"] == 1
    other_case = compute_rewrite_quality_counterfact(tiny_gpt2, tiny_tok, dict(RECORD, case_id=1))
    assert other_case["text"] != out["text"]
    with pytest.raises(ValueError, match="unknown generation protocol"):
        GenerationProtocol("nucleus")


@pytest.mark.parametrize("protocol", [SHORT_PUBLISHED, GREEDY_4], ids=["published", "greedy"])
def test_texts_of_many_cases_generated_together_equal_one_case_at_a_time(tiny_llama, tiny_tok, protocol):
    """Batching the prompts of several cases (sorted by length, batches of 3 here) changes no text: each
    sampled text depends on its prompt and its case's seed only."""
    cases = [(["The capital of France is", "A"], 4), (["Paris is in the country of", "B", "Hello"], 7),
             (["Water boils at"], 4), ([], 9)]
    batched = dataclasses.replace(protocol, batch_size=3)
    together = batched.generate_many(tiny_llama, tiny_tok, cases)
    assert [len(texts) for texts in together] == [2, 3, 1, 0]
    assert together == [protocol.generate(tiny_llama, tiny_tok, prompts, case_id) for prompts, case_id in cases]
    assert all(text.startswith(prompt) for (prompts, _), texts in zip(cases, together)
               for prompt, text in zip(prompts, texts))
    if protocol.name == PUBLISHED:  # the case id seeds the text: the same prompt differs between cases
        assert together[0][0] != batched.generate(tiny_llama, tiny_tok, ["The capital of France is"], 5)[0]


def _argmax_continuation(model, tok, prompt: str, n_new: int) -> str:
    ids = tok(prompt)["input_ids"]
    new = []
    for _ in range(n_new):
        token = int(_full_logits(model, ids + new)[-1].argmax())
        if token == tok.eos_token_id:
            break
        new.append(token)
    return prompt + tok.decode(new, skip_special_tokens=True)


@pytest.mark.parametrize("model_fixture", ["tiny_gpt2", "tiny_llama"])
def test_greedy_option_equals_argmax_decoding(request, tiny_tok, model_fixture):
    model = request.getfixturevalue(model_fixture)
    protocol = GenerationProtocol(GREEDY, max_new_tokens=8)
    out = compute_rewrite_quality_counterfact(model, tiny_tok, RECORD, generation_protocol=protocol)
    assert out["text"] == [_argmax_continuation(model, tiny_tok, p, 8) for p in RECORD["generation_prompts"]]
    assert out["generation_protocol"] == {"name": GREEDY, "decoding": "greedy (argmax)", "max_new_tokens": 8,
                                          "length_includes_prompt": False, "stops_at_eos": True}
    assert GenerationProtocol(GREEDY).to_dict()["max_new_tokens"] == 50


# ---------------------------------------------------------------- tf-idf substitute

SUBSTITUTE_RECORDS = [
    {"case_id": 1, "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P17", "subject": "Lyon",
                                         "target_new": {"str": "Italy", "id": "Q38"},
                                         "target_true": {"str": "France", "id": "Q142"}},
     "paraphrase_prompts": ["Lyon lies in"], "neighborhood_prompts": ["Nice is located in"],
     "attribute_prompts": ["Rome is located in"], "generation_prompts": ["Lyon is known for"]},
    {"case_id": 2, "requested_rewrite": {"prompt": "{} is located in", "relation_id": "P17", "subject": "Milan",
                                         "target_new": {"str": "France", "id": "Q142"},
                                         "target_true": {"str": "Italy", "id": "Q38"}},
     "paraphrase_prompts": [], "neighborhood_prompts": ["Turin is located in"],
     "attribute_prompts": ["Paris is located in", "Nice is located in"],
     "generation_prompts": ["Milan is known for", "Milan is known for"]},
]


def _substitute_data(folder, monkeypatch):
    """A data folder with CounterFact records and WikiText files but none of ROME's consistency files."""
    monkeypatch.delenv("ECE_DATA_DIR", raising=False)
    monkeypatch.setattr("dsets.data_files._globals_data_dir", lambda: folder / "none")
    (folder / "wikitext").mkdir(parents=True)
    (folder / "counterfact.json").write_text(json.dumps(SUBSTITUTE_RECORDS))
    (folder / "wikitext" / "wiki.valid.raw").write_text(
        " \n = Lyon = \n \n Lyon is a city in France . \n The Rhone flows through Lyon . \n")
    (folder / "wikitext" / "wiki.test.raw").write_text(" = Rome = \n Rome is the capital of Italy . \n")
    return folder


def test_counterfact_reference_entries_hand_checked():
    snips = AttributeSnippets.from_entries(counterfact_reference_entries(SUBSTITUTE_RECORDS))
    assert snips.texts("P17", "Q142") == ["Lyon is located in France", "Nice is located in France",
                                          "Paris is located in France"]  # the second "Nice ..." is dropped
    assert snips.texts("P17", "Q38") == ["Rome is located in Italy", "Milan is located in Italy",
                                         "Turin is located in Italy"]
    assert snips["P17"]["Q142"][0]["name"] == "Lyon" and snips.texts("P19", "Q142") == []


def test_fit_tfidf_vectors_matches_sklearn():
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = ["Paris is in France", "Rome is the capital of Italy", "The Louvre is in Paris, France.", "a b"]
    sk = TfidfVectorizer().fit(docs)
    ours = fit_tfidf_vectors(docs)
    assert ours.vocab == {k: int(v) for k, v in sk.vocabulary_.items()}
    np.testing.assert_allclose(ours.idf, sk.idf_, rtol=1e-12)
    with pytest.raises(ValueError, match="no words"):
        fit_tfidf_vectors(["a", "!"])


def test_tfidf_substitute_fitted_cached_and_reloaded(tmp_path, monkeypatch):
    data = _substitute_data(tmp_path / "data", monkeypatch)
    stats = tmp_path / "stats"
    monkeypatch.setenv("ECE_STATS_DIR", str(stats))
    resources = consistency_resources(data)
    assert resources.source == SUBSTITUTE_SOURCE == "tf-idf substitute: WikiText+CounterFact"
    assert resources.unavailable_reason is None
    cache = stats / "tfidf_substitute"
    assert sorted(p.name for p in cache.iterdir()) == ["fingerprint.json", "idf.npy", "tfidf_vocab.json"]
    # 3 WikiText paragraphs + 9 distinct CounterFact sentences; "located" is in the 6 reference sentences
    vec = resources.vectors
    assert vec.idf[vec.vocab["located"]] == pytest.approx(math.log(13 / 7) + 1)
    assert vec.idf[vec.vocab["rhone"]] == pytest.approx(math.log(13 / 2) + 1)
    assert resources.snippets.texts("P17", "Q142")[-1] == "Paris is located in France"

    def no_fit(documents):
        raise AssertionError("the cached statistics should have been reused")

    with monkeypatch.context() as patched:
        patched.setattr(tfidf_stats, "fit_tfidf_vectors", no_fit)
        again = consistency_resources(data)
    np.testing.assert_array_equal(again.vectors.idf, vec.idf)
    assert again.vectors.vocab == vec.vocab
    with open(data / "wikitext" / "wiki.test.raw", "a") as f:
        f.write(" Turin is located in Italy . \n")
    refitted = consistency_resources(data).vectors  # an input changed: fitted again
    assert refitted.idf[refitted.vocab["located"]] == pytest.approx(math.log(14 / 8) + 1)
    assert json.loads((cache / "fingerprint.json").read_text())["n_terms"] == len(refitted.vocab)


def test_substitute_consistency_scored_labelled_and_summarised(tiny_gpt2, tiny_tok, tmp_path, monkeypatch):
    """The substitute's reference score, its label in the case metrics, and the label in summarize.py's table."""
    import summarize

    data = _substitute_data(tmp_path / "data", monkeypatch)
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    from experiments.driver import Evaluator
    from experiments.evaluate import parse_args

    evaluator = Evaluator("mcf", data, skip_generation=False, interval=1, batch_size=32, seed=3)
    record = SUBSTITUTE_RECORDS[1]
    out = evaluator(tiny_gpt2, tiny_tok, record)
    assert out["consistency_source"] == SUBSTITUTE_SOURCE and out["generation_protocol"]["seed"] == 3
    references = " ".join(["Lyon is located in France", "Nice is located in France", "Paris is located in France"])
    expected = tfidf_similarity(" ".join(out["text"]), references, evaluator.consistency.vectors)
    assert out["reference_score"] == pytest.approx(expected) and 0 < expected < 1  # "is" is shared
    assert evaluator(tiny_gpt2, tiny_tok, record)["text"] == out["text"]  # a resumed run generates the same
    greedy = Evaluator("mcf", data, False, 1, 32, generation_protocol="greedy")(tiny_gpt2, tiny_tok, record)
    assert greedy["generation_protocol"]["name"] == GREEDY and greedy["text"][0] == greedy["text"][1]
    required = ["--alg_name", "MEMIT", "--model_name", "m", "--hparams_fname", "h"]
    assert parse_args(required).generation_protocol == PUBLISHED
    assert parse_args(required + ["--generation_protocol", "greedy"]).generation_protocol == GREEDY

    run = tmp_path / "results" / "MEMIT" / "run_000"
    run.mkdir(parents=True)
    (run / "params.json").write_text(json.dumps({"alg_name": "MEMIT", "generation_protocol": "published"}))
    (run / "1_edits-case_2.json").write_text(json.dumps({"case_id": 2, "grouped_case_ids": [2], "time": 1.0,
                                                          "pre": out}))
    (summary,) = summarize.summarize("MEMIT", results_dir=tmp_path / "results")
    pre = summary["stages"]["pre"]
    assert pre["consistency_source"] == SUBSTITUTE_SOURCE and pre["generation_protocol"]["name"] == PUBLISHED
    assert pre["consistency"]["mean"] == pytest.approx(100 * expected)
    text = summarize.render_text([summary])
    assert "Consistency (tf-idf substitute: WikiText+CounterFact)" in text.splitlines()[0]
    assert "published: top-k 5 sampling, 100 tokens including the prompt, seed 3" in text


def test_no_substitute_without_its_inputs(tmp_path, monkeypatch):
    monkeypatch.delenv("ECE_DATA_DIR", raising=False)
    monkeypatch.setattr("dsets.data_files._globals_data_dir", lambda: tmp_path / "none")
    (tmp_path / "counterfact.json").write_text(json.dumps(SUBSTITUTE_RECORDS))
    resources = consistency_resources(tmp_path, stats_dir=tmp_path / "stats")
    assert resources.snippets is None and resources.vectors is None and resources.source is None
    assert "wikitext/wiki.valid.raw" in resources.unavailable_reason and "idf.npy" in resources.unavailable_reason
    assert not (tmp_path / "stats").exists()


# ---------------------------------------------------------------- embedded model, real records

# ---------------------------------------------------------------- free generation


class TokenHistories(list):
    """ScriptedLM's cache: one token list per row; ``crop(-n)`` forgets the last ``n`` of each, as
    transformers' caches do."""

    def crop(self, tokens_to_remove: int):
        assert tokens_to_remove <= 0
        for history in self:
            del history[len(history) + tokens_to_remove:]


class ScriptedLM(torch.nn.Module):
    """A causal LM that says exactly what it is told: after a scripted prompt's ids (and any prefix of its
    continuation) the next continuation token gets logit 10, everything else 0; unscripted text ends with
    the end-of-text token. Its "cache" is the token history, so cached decoding and teacher forcing see
    the same model."""

    def __init__(self, tok, script: dict):
        super().__init__()
        self.embed = torch.nn.Embedding(1, 1)
        self.vocab, self.eos = len(tok), tok.eos_token_id
        self.script = [(tok(prompt)["input_ids"], list(ids)) for prompt, ids in script.items()]

    def get_input_embeddings(self):
        return self.embed

    def _next(self, history: list) -> int:
        for context, continuation in self.script:
            done = len(history) - len(context)
            if history[: len(context)] == context and 0 <= done < len(continuation) \
                    and history[len(context):] == continuation[:done]:
                return continuation[done]
        return self.eos

    def forward(self, input_ids, attention_mask=None, past_key_values=None, **_):
        from transformers.modeling_outputs import CausalLMOutputWithPast

        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -input_ids.shape[1]:]
        histories = TokenHistories(list(h) for h in past_key_values) if past_key_values else \
            TokenHistories([] for _ in input_ids)
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for row, (ids, keep) in enumerate(zip(input_ids.tolist(), mask.tolist())):
            for position, (token, real) in enumerate(zip(ids, keep)):
                if real:
                    histories[row].append(token)
                    logits[row, position, self._next(histories[row])] = 10.0
        return CausalLMOutputWithPast(logits=logits, past_key_values=histories)


def _ids(tok, text: str) -> list:
    return tok(text, add_special_tokens=False)["input_ids"]


FREE_RECORD = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
                          "relation_id": "P131", "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    "paraphrase_prompts": ["The Eiffel Tower stands in", "The Eiffel Tower is found in",
                           "Where is the Eiffel Tower? In"],
    "neighborhood_prompts": ["The Louvre is located in the city of", "Notre-Dame is in", "The Seine flows through"],
}


def _scripted_free_model(tok):
    """Every way the free answer and teacher forcing can disagree, one prompt each (see the test)."""
    spelled = [i for ch in " Paris" for i in _ids(tok, ch)]  # " Paris" in other tokens than the canonical ones
    assert spelled != _ids(tok, " Paris") and tok.decode(spelled) == " Paris"
    return ScriptedLM(tok, {
        "The Eiffel Tower is located in the city of": _ids(tok, " Rome, not Paris"),
        "The Eiffel Tower stands in": _ids(tok, " Rome, Italy."),
        "The Eiffel Tower is found in": _ids(tok, " Rome") + _ids(tok, "o and Juliet"),
        "Where is the Eiffel Tower? In": _ids(tok, " the city of Rome"),
        "The Louvre is located in the city of": _ids(tok, " Paris\n Rome"),
        "Notre-Dame is in": _ids(tok, " Paris and Rome"),
        "The Seine flows through": spelled + _ids(tok, "."),
    })


def test_free_generation_differs_from_teacher_forcing_where_it_should(tiny_tok):
    out = compute_rewrite_quality_counterfact(_scripted_free_model(tiny_tok), tiny_tok, FREE_RECORD,
                                              skip_generation=True)
    # teacher forcing: every target token top-1
    assert out["rewrite_prompts_correct"] == [True]
    assert out["paraphrase_prompts_correct"] == [True, True, False]
    assert out["neighborhood_prompts_correct"] == [True, True, False]
    # free: " Rome, not Paris" names the old fact; " Romeo ..." is not " Rome"; a preamble is not the answer;
    # the line break ends " Paris"; " Paris and Rome" names the new fact; another spelling of " Paris" counts
    assert out["rewrite_prompts_generated_correct"] == [False]
    assert out["paraphrase_prompts_generated_correct"] == [True, False, False]
    assert out["neighborhood_prompts_generated_correct"] == [True, False, True]
    assert out["rewrite_prompts_generated_text"] == [" Rome, not Paris"]
    assert out["paraphrase_prompts_generated_text"][1] == " Romeo and Juliet"
    assert out["neighborhood_prompts_generated_text"][0] == " Paris"
    assert out["free_generation"] == FreeGeneration().to_dict() and out["free_generation"]["extra_tokens"] == 10


def test_free_generation_on_zsre_checks_the_start_only(tiny_tok):
    record = {"case_id": 0, "requested_rewrite": dict(FREE_RECORD["requested_rewrite"]),
              "paraphrase_prompts": FREE_RECORD["paraphrase_prompts"][:2],
              "neighborhood_prompts": [{"prompt": "Notre-Dame is in", "target": "Paris"}]}
    out = compute_rewrite_quality_zsre(_scripted_free_model(tiny_tok), tiny_tok, record)
    # zsRE's target_true is no reliable competing answer: " Rome, not Paris" and " Paris and Rome" pass
    assert out["rewrite_prompts_generated_correct"] == [True]
    assert out["paraphrase_prompts_generated_correct"] == [True, False]
    assert out["neighborhood_prompts_generated_correct"] == [True]
    assert all(out["rewrite_prompts_correct"][0]) and "free_generation" in out
    skipped = compute_rewrite_quality_zsre(_scripted_free_model(tiny_tok), tiny_tok, record, free_generation=None)
    assert not any("generated" in k for k in skipped) and "free_generation" not in skipped


@pytest.mark.parametrize("answer, expected, competing, success", [
    (" Rome", "Rome", "Paris", True), ("Rome's Colosseum", "Rome", None, True), (" rome", "Rome", None, False),
    (" Romeo", "Rome", None, False), (" Rome, Paris", "Rome", "Paris", False),
    (" Rome, Parisian", "Rome", "Paris", True),  # "Parisian" does not name Paris as a word
    (" Old English", "Old English", "English", True), (" U.S. Army", " U.S.", None, True), ("", "Rome", None, False),
])
def test_answer_correct_rule(answer, expected, competing, success):
    assert answer_correct(answer, expected, competing) is success


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_gpt2", "tiny_tok"), ("tiny_llama", "tiny_tok_bos")])
def test_free_generation_decodes_like_an_unbatched_argmax_loop(request, model_fixture, tok_fixture):
    """Left padding, explicit positions and the cache change nothing: the batched answers are those of
    one prompt at a time without a cache; and a target made of the greedy tokens is top-1 under teacher
    forcing (greedy decoding of len(target) tokens and teacher forcing coincide)."""
    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    out = compute_rewrite_quality_counterfact(model, tok, RECORD, skip_generation=True)
    top1_checked = 0
    budget = {"rewrite_prompts": len(_ids(tok, " France")), "paraphrase_prompts": len(_ids(tok, " France")),
              "neighborhood_prompts": len(_ids(tok, " Italy"))}
    for kind, prompts in (("rewrite_prompts", ["Paris is located in"]),
                          ("paraphrase_prompts", RECORD["paraphrase_prompts"]),
                          ("neighborhood_prompts", RECORD["neighborhood_prompts"])):
        for prompt, text in zip(prompts, out[f"{kind}_generated_text"]):
            ids = tok(prompt)["input_ids"]
            new = []
            for _ in range(budget[kind] + 10):
                new.append(int(_full_logits(model, ids + new)[-1].argmax()))
            assert text == answer_text(tok, new)
            target = tok.decode(new[:2]).strip()
            if target and _ids(tok, " " + target) == new[:2]:
                assert all(continuation_scores(model, tok, [prompt], [target])[0].token_correct)
                top1_checked += 1
    assert top1_checked >= 2


@pytest.mark.parametrize("flag", [False, True])
def test_skip_free_generation_flag_reaches_the_cases_and_params(flag, tiny_tok, data_dir, tmp_path, monkeypatch):
    """``--skip_free_generation``: params.json says whether the metric ran, and the evaluator leaves its keys out."""
    import experiments.evaluate as evaluate
    from experiments.driver import Evaluator

    monkeypatch.setenv("ECE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))

    def stop(*args, **kwargs):
        raise KeyboardInterrupt  # after params.json is written, before any model is loaded

    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", stop)
    with pytest.raises(KeyboardInterrupt):
        evaluate.main(["--model_name", "smollm2-135m", "--device", "cpu", "--alg_name", "MEMIT", "--hparams_fname",
                       "smollm2-135m.json", "--dataset_size_limit", "1", *(["--skip_free_generation"] * flag)])
    params = json.loads((tmp_path / "results" / "MEMIT" / "run_000" / "params.json").read_text())
    assert params["free_generation"] == (None if flag else FreeGeneration().to_dict())

    model = _scripted_free_model(tiny_tok)
    cf = Evaluator("mcf", data_dir, skip_generation=True, interval=1, batch_size=32, free_generation=not flag)
    zsre = Evaluator("zsre", data_dir, skip_generation=True, interval=1, batch_size=32, free_generation=not flag)
    zsre_record = {"case_id": 0, "requested_rewrite": FREE_RECORD["requested_rewrite"], "paraphrase_prompts": [],
                   "neighborhood_prompts": [{"prompt": "Notre-Dame is in", "target": "Paris"}]}
    for out in (cf(model, tiny_tok, FREE_RECORD), zsre(model, tiny_tok, zsre_record)):
        assert ("rewrite_prompts_generated_correct" in out) is (not flag)
        assert ("free_generation" in out) is (not flag) and "rewrite_prompts_correct" in out


def test_sampling_unchanged_by_the_shared_decoding_loop(tiny_gpt2, tiny_tok):
    """The published protocol's texts are still the step-by-step top-k draws of each prompt's generator."""
    prompts = ["Paris is known for", "The people"]
    sequences = sample_top_k_ids(tiny_gpt2, tiny_tok, prompts, seeds=[3, 4], max_out_len=12, top_k=5)
    for prompt, seed, sequence in zip(prompts, [3, 4], sequences):
        generator, ids = torch.Generator().manual_seed(seed), tiny_tok(prompt)["input_ids"]
        while len(ids) < 12:
            top = torch.topk(torch.softmax(_full_logits(tiny_gpt2, ids)[-1].float(), -1), 5)
            ids.append(int(top.indices[torch.multinomial(top.values / top.values.sum(), 1, generator=generator)]))
        assert sequence == ids


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_gpt2", "tiny_tok"), ("tiny_llama", "tiny_tok_bos")])
def test_cache_with_reserved_room_decodes_and_crops_as_the_growing_cache(request, model_fixture, tok_fixture):
    """``reserve_room``: decoding steps write into reserved buffers (and past the room, which grows them) and
    crop like ``DynamicLayer``, with the logits of the concatenating cache."""
    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    ids = torch.tensor([tok("Paris is known for its wine and the people")["input_ids"]])
    cache_name = _forward_kwargs(model)["cache"]
    step = lambda cache, token_ids: model(input_ids=token_ids, use_cache=True, **{cache_name: cache})
    with torch.no_grad():
        growing, roomy = step(None, ids[:, :4]), step(None, ids[:, :4])
        growing, roomy = _cache_of(growing), _cache_of(roomy)
        reserve_room(roomy, 2)
        assert all(isinstance(layer, roomy_layer_class()) for layer in roomy.layers)
        buffer = roomy.layers[0]._buffers[0]
        for position in range(4, 9):  # two positions fit the room, the third moves to larger buffers
            expected, got = step(growing, ids[:, position : position + 1]), step(roomy, ids[:, position : position + 1])
            assert torch.allclose(got.logits, expected.logits, atol=1e-5)
            growing, roomy = _cache_of(expected), _cache_of(got)
            assert (roomy.layers[0]._buffers[0] is buffer) is (position < 6)
        growing.crop(-3)
        roomy.crop(-3)
        assert roomy.get_seq_length() == growing.get_seq_length() == 6
        for a, b in zip(growing.layers, roomy.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
        expected, got = step(growing, ids[:, 9:10]), step(roomy, ids[:, 9:10])
        assert torch.allclose(got.logits, expected.logits, atol=1e-5)


@pytest.mark.slow
def test_embedded_model_prefers_true_targets_before_editing(embedded_model_and_tok, data_dir):
    model, tok = embedded_model_and_tok
    records = CounterFactDataset(data_dir, size=10)
    margins, correct, said_new = [], [], []
    for record in records:
        rewrite_only = dict(record, paraphrase_prompts=[], neighborhood_prompts=[])
        out = compute_rewrite_quality_counterfact(model, tok, rewrite_only, skip_generation=True)
        probs = out["rewrite_prompts_probs"][0]
        margins.append(probs["target_new"] - probs["target_true"])
        correct += out["rewrite_prompts_correct"]
        said_new += out["rewrite_prompts_generated_correct"]
    # measured (SmolLM2-135M-Instruct, Q4_1 dequantised): 7 of 10 positive, mean margin 1.25 nats
    assert sum(m > 0 for m in margins) >= 6
    assert np.mean(margins) > 0.5
    assert not any(correct)  # before editing, no counterfactual target is the top-1 continuation
    assert not any(said_new)  # ... nor what the model says when it decodes freely
    # well-known facts: "Porsche 911, created by" Porsche (vs Honda), Gilad Atzmon's language Hebrew (vs Italian)
    assert margins[1] > 2 and margins[4] > 2

    full = compute_rewrite_quality_counterfact(model, tok, records[1], skip_generation=True)
    assert len(full["paraphrase_prompts_probs"]) == 2 and len(full["neighborhood_prompts_probs"]) == 10
    assert all(p["target_new"] - p["target_true"] > 1 for p in full["paraphrase_prompts_probs"])
    assert all(p["target_new"] - p["target_true"] > 1 for p in full["neighborhood_prompts_probs"])
    # measured: 4 of the 10 neighbourhood prompts continue with " Porsche" (target_true) as top-1 tokens
    assert sum(full["neighborhood_prompts_correct"]) >= 2 and not any(full["paraphrase_prompts_correct"])
    # a free answer that begins with " Porsche" is the top-1 continuation under teacher forcing as well
    free = full["neighborhood_prompts_generated_correct"]
    assert all(tf for tf, said in zip(full["neighborhood_prompts_correct"], free) if said)
    assert all(text.strip() for text in full["neighborhood_prompts_generated_text"])


@pytest.mark.parametrize("ds_name", ["mcf", "zsre"])
def test_records_scored_together_equal_records_scored_alone(ds_name, tiny_llama, tiny_tok, data_dir):
    """``Evaluator.many`` (a round's records in shared, length-sorted batches) gives each record the metrics it
    gets alone: the same NLLs up to float rounding, the same top-1 flags and greedy answers, and generation
    texts only for the records the interval selects."""
    from experiments.driver import Evaluator, load_records

    records = load_records(ds_name, data_dir, 7)
    evaluator = Evaluator(ds_name, data_dir, skip_generation=False, interval=3, batch_size=8,
                          generation_protocol="greedy")
    evaluator.generation = GenerationProtocol(GREEDY, max_new_tokens=3)
    together = evaluator.many(tiny_llama, tiny_tok, records)
    alone = [evaluator(tiny_llama, tiny_tok, record) for record in records]
    assert len(together) == len(records)
    compared = 0
    for record, joint, single in zip(records, together, alone):
        assert joint.keys() == single.keys()
        assert ("text" in joint) is (ds_name == "mcf" and record["case_id"] % 3 == 0)
        for key in joint:
            if key.endswith("_probs"):
                flat = lambda entries: [v for entry in entries for v in (entry["target_new"], entry["target_true"])]
                assert flat(joint[key]) == pytest.approx(flat(single[key]), rel=1e-4, abs=1e-4)
                compared += len(joint[key])
            else:
                assert joint[key] == single[key], key
    assert compared >= (7 * 3 if ds_name == "mcf" else 0)


def test_evaluation_benchmark_reports_agreement(tiny_llama, tiny_tok, data_dir):
    """experiments/benchmark_evaluation.py: both ways of scoring agree, and a disagreement would be counted."""
    from experiments.benchmark_evaluation import agreement, measure
    from experiments.driver import load_records

    row = measure(tiny_llama, tiny_tok, "mcf", load_records("mcf", data_dir, 4), True, 8, data_dir)
    assert row["n_records"] == 4 and row["differing_prompts"] == 0 and row["max_nll_difference"] < 1e-4
    assert row["seconds_per_record_alone"] > 0 and row["seconds_per_record_together"] > 0
    stage = {"rewrite_prompts_probs": [{"target_new": 1.0, "target_true": 2.0}], "rewrite_prompts_correct": [True],
             "rewrite_prompts_generated_text": ["Rome"]}
    other = {"rewrite_prompts_probs": [{"target_new": 1.5, "target_true": 2.0}], "rewrite_prompts_correct": [False],
             "rewrite_prompts_generated_text": ["Paris"]}
    assert agreement([stage], [other]) == {"max_nll_difference": 0.5, "differing_prompts": 2}


@pytest.mark.parametrize("model_fixture, tok_fixture", [("tiny_gpt2", "tiny_tok"), ("tiny_llama", "tiny_tok_bos")])
def test_one_prompt_pass_equals_separate_scoring_and_decoding(request, model_fixture, tok_fixture):
    """``score_and_answer`` runs each prompt once, continues every target from its cache (cut back after each)
    and decodes from it, decoding several prefill batches of different widths together: the NLLs and top-1 flags
    must be those of ``continuation_scores``, and the answers those of an argmax loop over one prompt at a time
    without a cache, whatever the batching."""
    from util.generate import score_and_answer

    model, tok = request.getfixturevalue(model_fixture), request.getfixturevalue(tok_fixture)
    prompts = ["Paris is located in", "The Eiffel Tower, a famous landmark of the city, stands in", "Rome is in",
               "Notre-Dame is in", "Where is the Louvre? It is in the country of", "Berlin"]
    targets = [["France", "Italy"], ["the French Republic", "Italy"], ["Italy"], ["France", "the Vatican City"],
               ["France", "Spain"], ["Germany", "a country in Europe"]]
    budgets = [3, 12, 0, 5, 7, 4]
    separate = continuation_scores(model, tok, [p for p, ts in zip(prompts, targets) for _ in ts],
                                   [t for ts in targets for t in ts])
    answers = []
    for prompt, budget in zip(prompts, budgets):
        ids, new = tok(prompt)["input_ids"], []
        for _ in range(budget):
            new.append(int(_full_logits(model, ids + new)[-1].argmax()))
        answers.append(new)
    assert any(len(_ids(tok, " " + t)) > 2 for ts in targets for t in ts)  # multi-token continuations are fed
    for batch_size, decode_batches in ((1, 1), (2, 2), (4, 3), (64, 4)):
        joint = score_and_answer(model, tok, prompts, targets, budgets, batch_size=batch_size,
                                 decode_batches=decode_batches)
        flat = [score for scores, _ in joint for score in scores]
        assert [len(scores) for scores, _ in joint] == [len(ts) for ts in targets]
        for mine, theirs in zip(flat, separate):
            assert mine.token_nlls == pytest.approx(theirs.token_nlls, abs=1e-4)
            assert mine.token_correct == theirs.token_correct
        assert [answer for _, answer in joint] == answers
        assert [len(answer) for _, answer in joint] == budgets
