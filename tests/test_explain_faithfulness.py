"""experiments/explain_faithfulness.py: the ablation rows equal a hand-made ablation, the areas and the
relation-structure numbers are what their definitions say, and the script runs end to end on a tiny model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ece.hparams import ECEHyperParams
from editing.keys import fact_token_index
from experiments import explain_faithfulness as faith
from tests.conftest import TINY_REQUESTS, tiny_hparams
from util.hooks import Trace
from util.tokens import prompt_ids, target_ids


def _manual_relative_prob(model, tok, request, hparams, layer_neurons, positions, replacement):
    """P(true) with ``x[pos, neurons] = replacement[layer][neurons]`` at each layer, over P(true) untouched,
    one unbatched forward each."""
    prompt = prompt_ids(tok, request["prompt"].format(request["subject"]))
    truth = target_ids(tok, request["target_true"]["str"])
    ids = torch.tensor([prompt + truth])

    def log_p(edits):
        hooks = [Trace(model, hparams.rewrite_module(l), retain_output=False, edit_input=e) for l, e in edits.items()]
        try:
            logits = model(input_ids=ids).logits[0]
        finally:
            for h in hooks:
                h.close()
        log_probs = torch.log_softmax(logits.float(), -1)
        return sum(float(log_probs[len(prompt) - 1 + i, t]) for i, t in enumerate(truth))

    def replace(layer, neurons):
        def edit(x):
            x = x.clone()
            for p in positions:
                x[0, p, neurons] = replacement[layer][neurons]
            return x
        return edit

    edits = {l: replace(l, n) for l, n in layer_neurons.items()}
    return float(np.exp(log_p(edits) - log_p({})))


@pytest.mark.parametrize("where", ["fact", "subject"])
def test_ablation_rows_equal_a_hand_made_ablation(tiny_llama, tiny_tok, where):
    hparams = tiny_hparams("llama", ECEHyperParams)
    request = TINY_REQUESTS[0]
    width = 64
    generator = torch.Generator().manual_seed(0)
    ranks = {o: {l: torch.randperm(width, generator=generator) for l in hparams.layers} for o in ("AS", "random")}
    means = {l: torch.randn(width, generator=generator) for l in hparams.layers}
    layer_sets = {"all": [1, 2], "1": [1]}
    plan = faith.row_plan(layer_sets, list(ranks), [0.05, 0.25], ["zero", "mean"], [where])
    values, p_true = faith.fact_relative_probs(tiny_llama, tiny_tok, request, ranks, plan, layer_sets, means, hparams,
                                               batch_size=7)
    assert 0 < p_true < 1 and values.shape == (len(plan),)
    positions = faith.ablated_positions(tiny_tok, request, hparams.fact_token, where)
    last = fact_token_index(tiny_tok, request["prompt"], request["subject"], "subject_last")
    assert positions[-1] == last and (len(positions) == 1) == (where == "fact")
    zeros = {l: torch.zeros(width) for l in hparams.layers}
    for row, (_, ablation, set_name, order, kind, fraction) in enumerate(plan):
        neurons = {}
        for layer in layer_sets[set_name]:
            k = 0 if kind == "none_kept" else max(1, round(fraction * width))
            top = ranks[order][layer][:k] if order else torch.zeros(0, dtype=torch.long)
            keep = torch.ones(width, dtype=torch.bool)
            keep[top] = False
            neurons[layer] = top if kind == "deletion" else torch.nonzero(keep)[:, 0]
        expected = _manual_relative_prob(tiny_llama, tiny_tok, request, hparams, neurons, positions,
                                         means if ablation == "mean" else zeros)
        assert values[row] == pytest.approx(expected, rel=1e-4), plan[row]
    # Something was ablated in every row: the model is not indifferent to all of them.
    assert np.abs(values - 1).max() > 1e-3


def test_curve_area_is_the_mean_over_log_k():
    fractions = [0.01, 0.1, 1.0]
    assert faith.curve_area(np.full((2, 3), 0.7), fractions) == pytest.approx([0.7, 0.7])
    # Linear in log k from 1 to 0: area 0.5; a step at the middle point counts half of each segment.
    assert faith.curve_area(np.array([[1.0, 0.5, 0.0], [1.0, 0.0, 0.0]]), fractions) == pytest.approx([0.5, 0.25])


def test_summary_ranks_scores_by_deletion_area_and_compares_with_random():
    fractions = [0.01, 0.02, 0.1]
    layer_sets = {"all": [0]}
    plan = faith.row_plan(layer_sets, ["AS", "random"], fractions, ["zero"], ["fact"])
    values = np.ones((4, len(plan)))
    for i, (_, _, _, order, kind, _) in enumerate(plan):
        if kind == "deletion":
            values[:, i] = 0.4 if order == "AS" else 0.9
        elif kind == "insertion":
            values[:, i] = 0.8 if order == "AS" else 0.1
    values[0] -= 0.1  # spread over facts, for a non-empty interval
    block = faith.summarise_curves(values, plan, fractions, ["AS", "random"])["fact"]["zero"]["all"]
    assert block["ranking_by_deletion_area"] == ["AS", "random"]
    assert block["AS"]["deletion_area"]["mean"] == pytest.approx(0.4 - 0.1 / 4)
    assert block["AS"]["deletion_area"]["ci_low"] < 0.375 < block["AS"]["deletion_area"]["ci_high"]
    assert block["AS"]["deletion_drop_at_2pct"]["mean"] == pytest.approx(0.6 + 0.1 / 4)
    assert block["random"]["insertion_area"]["mean"] == pytest.approx(0.1 - 0.1 / 4)
    assert block["best_over_random_drop"] == pytest.approx((1 - 0.375) / (1 - 0.875))
    assert block["best_over_random_drop_at_2pct"] == pytest.approx((0.6 + 0.1 / 4) / (0.1 + 0.1 / 4))


def test_relation_structure_finds_relations_that_share_neurons_and_random_sets_do_not():
    generator = torch.Generator().manual_seed(0)
    relations = np.repeat(["P1", "P2", "P3"], 6)
    scores = torch.rand((18, 120), generator=generator) * 0.1
    for i, r in enumerate(relations):
        block = int(r[1]) - 1
        scores[i, block * 12 : block * 12 + 12] += 1.0  # each relation's facts share 12 strong neurons
    rows = faith.relation_structure({"AS": {0: scores}}, [0], relations, seed=0)
    by_name = {(r["layer"], r["similarity"]): r for r in rows}
    top = by_name[("all", "Jaccard of top 0.1")]
    assert top["ari"] == pytest.approx(1.0)
    assert top["within"] == pytest.approx(1.0) and top["across"] == pytest.approx(0.0)
    assert top["random_ari"] < 0.5 and abs(top["random_within"] - top["random_across"]) < 0.1
    assert by_name[("0", "cosine of score vectors")]["ari"] == pytest.approx(1.0)
    with_single = np.append(relations, "P4")  # a relation with one fact has no within-relation pair: left out
    names, matrix = faith.relation_overlap_matrix((with_single[:, None] == with_single[None, :]).astype(float),
                                                  with_single)
    assert names == ["P1", "P2", "P3"] and np.allclose(matrix, np.eye(3))


def test_script_end_to_end_on_a_tiny_model(tmp_path, tiny_llama, tiny_tok, data_dir, monkeypatch):
    model_dir = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(model_dir)
    tiny_tok.save_pretrained(model_dir)
    hparams_file = tmp_path / "ece.json"
    hparams_file.write_text(json.dumps(tiny_hparams("llama", ECEHyperParams).to_dict()))
    # A random model knows no fact: take the first candidates as they come.
    monkeypatch.setattr(faith, "known_facts", lambda model, tok, candidates, n: list(candidates[:n]))
    out, plots = tmp_path / "faith.json", tmp_path / "plots"
    result = faith.main(["--model_name", str(model_dir), "--hparams_fname", str(hparams_file), "--n_facts", "8",
                         "--data_dir", str(data_dir), "--ig_steps", "2", "--mean_samples", "2", "--device", "cpu",
                         "--out", str(out), "--plots", str(plots)])
    saved = json.loads(out.read_text())
    assert saved["n_facts"] == 8 and saved["orders"] == ["WI", "AS", "RS", "GA", "GA_IG", "random"]
    block = saved["curves"]["fact"]["mean"]["all"]
    for order in saved["orders"]:
        area = block[order]["deletion_area"]
        assert area["ci_low"] <= area["mean"] <= area["ci_high"]
        assert len(block[order]["insertion"]["mean"]) == len(faith.FRACTIONS)
    assert set(saved["curves"]["fact"]["zero"]) == {"all", "1", "2"}
    scores_seen = {r["score"] for r in saved["relation_structure"]}
    assert scores_seen == {"AS", "RS", "GA", "GA_IG"}
    assert {r["layer"] for r in saved["relation_structure"]} == {"1", "2", "all"}
    assert result["relation_overlap"]["relations"]
    for name in ("deletion_insertion_fact.png", "relation_overlap.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_candidates_alternate_between_the_sources_and_keep_every_record(data_dir):
    both = faith.candidate_requests(data_dir, ["knowns", "mcf"])
    knowns, mcf = faith.candidate_requests(data_dir, ["knowns"]), faith.candidate_requests(data_dir, ["mcf"])
    assert len(both) == len(knowns) + len(mcf)
    assert [r["case_id"] for r in both[:4]] == [knowns[0]["case_id"], mcf[0]["case_id"], knowns[1]["case_id"],
                                               mcf[1]["case_id"]]
    assert all(r["prompt"].count("{}") == 1 and r.get("relation_id") for r in both)
    with pytest.raises(faith.RunError, match="unknown fact source 'wiki'"):
        faith.candidate_requests(data_dir, ["wiki"])
