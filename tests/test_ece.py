"""ECE on tiny random models: neuron selection, clustering, batched target loops, restricted update."""
import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from baselines.memit import apply_memit_to_model
from ece import ECEHyperParams, apply_ece_to_model
from ece.cluster import (cluster_requests, eigengap_cluster_count, jaccard_similarity, optimisation_loops,
                         relation_clusters, shuffled_clusters)
from ece.ece_main import ECERound
from ece.explain import column_l1_norms, neuron_scores, select_neurons
from editing.keys import compute_keys
from editing.sequential import SequentialState
from editing.target_values import compute_target_values
from util.hooks import get_module
from util.errors import RequestError
from util.hparams import HParamsError
from util.weights import read_weight


@pytest.fixture
def more_requests(edit_requests):
    """The three shared requests and a fourth (case id 3)."""
    return edit_requests + [
        {"case_id": 3, "prompt": "{} works in the field of", "subject": "Marie Curie",
         "target_new": {"str": "music"}, "target_true": {"str": "physics"}},
    ]


@pytest.fixture
def ece_hparams(make_hparams):
    """``ece_hparams(arch, **overrides)``: ECE hparams for a tiny model (make_hparams plus ECE's keys)."""
    def make(arch, **overrides):
        values = dict(neuron_threshold=0.8, n_clusters=None, max_clusters=4, z_mode="per_request")
        values.update(overrides)
        return make_hparams(arch, cls=ECEHyperParams, **values)

    return make


# -- nucleus selection ------------------------------------------------------------------------------

def test_select_neurons_keeps_the_smallest_top_set_reaching_the_threshold():
    scores = torch.tensor([1.0, 5.0, 0.0, 3.0, 1.0])  # total 10; sorted 5, 3, 1, 1, 0
    assert select_neurons(scores, 0.5).tolist() == [1]
    assert select_neurons(scores, 0.8).tolist() == [1, 3]  # 5 + 3 = 8 reaches 80%
    assert len(select_neurons(scores, 0.81)) == 3
    assert select_neurons(scores, 1.0).tolist() == [0, 1, 2, 3, 4]  # 1.0 keeps all, the zero too
    assert select_neurons(torch.zeros(3), 0.5).tolist() == [0, 1, 2]  # no mass: nothing to prefer


# -- clustering -----------------------------------------------------------------------------------

def test_jaccard_similarity_values():
    sets = [torch.tensor([0, 1, 2]), torch.tensor([1, 2, 3]), torch.tensor([7])]
    sim = jaccard_similarity(sets, width=8)
    assert sim[0, 1] == pytest.approx(2 / 4) and sim[0, 2] == 0 and np.allclose(np.diag(sim), 1)


def test_clustering_separates_clearly_separated_neuron_sets():
    rng = np.random.default_rng(0)
    group_a, group_b = np.arange(0, 40), np.arange(60, 100)
    sets = [torch.tensor(sorted(rng.choice(g, 30, replace=False))) for g in (group_a, group_b) * 4]
    truth = np.array([0, 1] * 4)
    labels = cluster_requests(sets, n_clusters=None, max_clusters=5, seed=0, width=100)
    assert len(set(labels)) == 2
    assert all((labels == labels[0]) == (truth == truth[0]))  # the same partition as the truth
    fixed = cluster_requests(sets, n_clusters=2, max_clusters=5, seed=0, width=100)
    assert (fixed == labels).all()
    assert eigengap_cluster_count(jaccard_similarity(sets, 100), max_clusters=5) == 2


def test_clustering_degenerate_cases():
    one = cluster_requests([torch.tensor([1, 2])], n_clusters=3, max_clusters=3)
    assert one.tolist() == [0]
    same = cluster_requests([torch.tensor([1, 2, 3])] * 5, n_clusters=None, max_clusters=4)
    assert same.tolist() == [0] * 5
    same_fixed = cluster_requests([torch.tensor([1, 2, 3])] * 5, n_clusters=3, max_clusters=4)
    assert same_fixed.tolist() == [0] * 5  # no more clusters than distinct sets
    few = cluster_requests([torch.tensor([1]), torch.tensor([5]), torch.tensor([9])], n_clusters=10, max_clusters=4)
    assert sorted(few.tolist()) == [0, 1, 2]  # more clusters asked than requests: one each
    assert cluster_requests([], n_clusters=None, max_clusters=3).tolist() == []


def test_optimisation_loops_split_large_clusters():
    labels = np.array([0, 1, 0, 0, 1, 0, 0])
    assert optimisation_loops(labels, None) == [[0, 2, 3, 5, 6], [1, 4]]
    assert optimisation_loops(labels, 2) == [[0, 2], [3, 5], [6], [1, 4]]
    # With widths a cluster is split among members of like width; it never mixes clusters.
    widths = [7, 3, 2, 7, 9, 2, 5]
    assert optimisation_loops(labels, 2, widths) == [[2, 5], [6, 0], [3], [1, 4]]
    assert optimisation_loops(labels, None, widths) == optimisation_loops(labels, None)


def separated_neuron_sets(groups: int = 2, per_group: int = 4) -> list:
    """Requests whose sets come from ``groups`` disjoint neuron ranges, interleaved: clusters 0, 1, 0, 1, ..."""
    rng = np.random.default_rng(0)
    ranges = [np.arange(50 * g, 50 * g + 40) for g in range(groups)]
    return [torch.tensor(sorted(rng.choice(r, 30, replace=False))) for r in ranges * per_group]


def test_relation_clusters_group_by_relation_in_order_of_first_appearance():
    requests = [{"subject": f"S{i}", "relation_id": r} for i, r in enumerate(["P17", "P36", "P17", "P1303", "P36"])]
    assert relation_clusters(requests).tolist() == [0, 1, 0, 2, 1]
    assert relation_clusters([]).tolist() == []
    requests[3] = {"case_id": 7, "subject": "Miles Davis"}  # an EasyEdit record: no relation_id
    with pytest.raises(RequestError, match=r"request 3 \(subject 'Miles Davis'\), case_id 7: no relation_id.*"
                                           r"use cluster_by \"neurons\""):
        relation_clusters(requests)


def test_checked_requests_keep_their_relation_id(edit_requests):
    """The API's request checks pass relation_id on, in both shapes, so cluster_by "relation" works there too."""
    from editing.requests import check_requests

    simple = {"prompt": "{} plays the", "subject": "Miles Davis", "target_new": "piano", "relation_id": "P1303"}
    memit_form = {"case_id": 9, "requested_rewrite": {**edit_requests[1], "relation_id": "P131"}}
    checked = check_requests([simple, memit_form, edit_requests[0]])
    assert [r.get("relation_id") for r in checked] == ["P1303", "P131", None]


def test_shuffled_clusters_keep_the_sizes_and_move_the_members():
    neuron_labels = cluster_requests(separated_neuron_sets(2, 5), n_clusters=None, max_clusters=5, seed=0, width=100)
    assert neuron_labels.tolist() == [0, 1] * 5  # a neuron clustering with two clusters
    uneven = np.array([0, 1, 1, 0, 2, 1, 1, 0, 2, 1])  # sizes 3, 5, 2
    for labels in (neuron_labels, uneven):
        shuffled = {seed: shuffled_clusters(labels, seed) for seed in range(5)}
        for seed, moved in shuffled.items():
            assert sorted(np.bincount(moved).tolist()) == sorted(np.bincount(labels).tolist())
            first_seen = list(dict.fromkeys(moved.tolist()))
            assert first_seen == list(range(len(first_seen)))  # numbered by first appearance
            assert (shuffled_clusters(labels, seed) == moved).all()  # reproducible for a seed
        assert any((moved != labels).any() for moved in shuffled.values())  # not the neuron partition
        assert len({tuple(moved.tolist()) for moved in shuffled.values()}) > 1  # the seed decides


def test_loop_size_follows_the_device_unless_the_hparams_set_it(tiny_llama, ece_hparams):
    from ece.ece_main import loop_size
    from editing.target_values import CPU_REQUESTS_PER_LOOP

    assert loop_size(tiny_llama, ece_hparams("llama")) == CPU_REQUESTS_PER_LOOP  # the fixture runs on the CPU
    assert loop_size(tiny_llama, ece_hparams("llama", z_batch_size=3)) == 3
    assert loop_size(tiny_llama, ece_hparams("llama", z_mode="shared")) is None  # a shared delta keeps its cluster
    meta = copy.deepcopy(tiny_llama).to("meta")  # any device that is not a CPU: one loop per cluster
    assert loop_size(meta, ece_hparams("llama")) is None


# -- explain --------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_neuron_scores_shapes_and_definitions(arch, request, tiny_tok, edit_requests, context_templates, ece_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = ece_hparams(arch)
    d_ff = read_weight(model, hp.rewrite_module(1)).shape[1]
    raw = model.get_submodule(hp.rewrite_module(1)).weight
    # WI is the L1 norm of each input neuron's column of W : d_ff -> d_model, whatever the storage.
    expected_wi = raw.abs().sum(1) if arch == "gpt2" else raw.abs().sum(0)
    assert torch.allclose(column_l1_norms(model, hp, 1), expected_wi)
    scores = {m: neuron_scores(model, tiny_tok, edit_requests, hp, context_templates, m)
              for m in ("AS", "WI", "RS", "GA")}
    keys = compute_keys(model, tiny_tok, edit_requests, hp, hp.layers, context_templates)
    for layer in hp.layers:
        for m in scores:
            assert scores[m][layer].shape == (len(edit_requests), d_ff) and (scores[m][layer] >= 0).all()
        assert torch.allclose(scores["AS"][layer], keys[layer].abs())
        assert torch.allclose(scores["RS"][layer], scores["AS"][layer] * scores["WI"][layer])
        assert (scores["WI"][layer] == scores["WI"][layer][0]).all()
        assert scores["GA"][layer].sum() > 0


def test_gradient_attribution_all_layers_at_once_equals_one_layer_at_a_time(tiny_llama, tiny_tok, edit_requests,
                                                                            context_templates, ece_hparams):
    """The one-backward path (embedding made to require grad) and the per-layer path (ig_steps=1: the
    layer's input made a leaf) must give the same gradient x activation, paths through later layers
    included."""
    def scores(ig_steps):
        hp = ece_hparams("llama", ig_steps=ig_steps)
        return neuron_scores(tiny_llama, tiny_tok, edit_requests, hp, context_templates, "GA")

    together, per_layer = scores(0), scores(1)
    for layer in together:
        assert torch.allclose(together[layer], per_layer[layer], rtol=1e-4, atol=1e-7)
    integrated = scores(4)
    assert not torch.allclose(integrated[1], together[1])  # a different attribution, same shape
    assert integrated[1].shape == together[1].shape


def test_gradient_attribution_batched_by_length_keeps_each_rows_score(tiny_gpt2, tiny_tok_bos, edit_requests,
                                                                        ece_hparams):
    """Rows are batched by length (long and short context templates mixed, requests interleaved); each
    request's template-averaged score must equal the one of that request scored alone, i.e. the scores
    return to their own rows."""
    from ece.explain import gradient_attribution

    hp = ece_hparams("gpt2")
    templates = [["{}"], ["A long context template made of many words here. {}", "Short. {}"]]
    layers = hp.layers[:2]
    batched = gradient_attribution(tiny_gpt2, tiny_tok_bos, edit_requests, hp, templates, layers, batch_size=2)
    for j, r in enumerate(edit_requests):
        alone = gradient_attribution(tiny_gpt2, tiny_tok_bos, [r], hp, templates, layers, batch_size=1)
        for layer in layers:
            assert torch.allclose(batched[layer][j], alone[layer][0], rtol=1e-3, atol=1e-7)
    assert not torch.allclose(batched[layers[0]][0], batched[layers[0]][1])  # the requests' scores differ


# -- batched target values ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cluster_loops_give_the_same_target_values_as_one_loop_per_request(arch, request, tiny_tok, more_requests,
                                                                           context_templates, ece_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = ece_hparams(arch, v_num_grad_steps=8, v_stop_loss=1e-9)
    alone = compute_target_values(model, tiny_tok, more_requests, hp, context_templates, z_layer=2, requests_per_loop=1)
    clustered = compute_target_values(model, tiny_tok, more_requests, hp, context_templates, z_layer=2,
                                      loops=[[3, 0], [2, 1]])
    assert clustered.loops == 2 and clustered.loop_of == [0, 1, 1, 0]
    # Same seed-free optimisation, different batch composition: equal up to float32 summation order.
    assert torch.allclose(clustered.targets, alone.targets, rtol=1e-4, atol=1e-5)
    assert clustered.steps == alone.steps
    with pytest.raises(ValueError, match="exactly once"):
        compute_target_values(model, tiny_tok, more_requests, hp, context_templates, z_layer=2, loops=[[0, 1], [1, 2]])


def test_stopped_requests_leave_the_batch(tiny_llama, tiny_tok, more_requests, context_templates, ece_hparams):
    hp = ece_hparams("llama", v_num_grad_steps=10, v_stop_loss=1e-9)
    everyone = compute_target_values(tiny_llama, tiny_tok, more_requests, hp, context_templates, z_layer=2)
    rows_per_request = sum(len(g) for g in context_templates) + 1
    assert everyone.forward_rows == 10 * rows_per_request * len(more_requests)
    # A stopping loss between the requests' first losses stops half at once; the rest run on alone.
    first = compute_target_values(tiny_llama, tiny_tok, more_requests, ece_hparams("llama", v_num_grad_steps=1),
                                  context_templates, z_layer=2).losses
    threshold = float(np.median(first))
    hp_stop = ece_hparams("llama", v_num_grad_steps=10, v_stop_loss=threshold)
    some = compute_target_values(tiny_llama, tiny_tok, more_requests, hp_stop, context_templates, z_layer=2)
    alone = compute_target_values(tiny_llama, tiny_tok, more_requests, hp_stop, context_templates, z_layer=2,
                                  requests_per_loop=1)
    assert len(set(some.steps)) > 1
    assert some.forward_rows == alone.forward_rows < everyone.forward_rows
    assert torch.allclose(some.targets, alone.targets, rtol=1e-4, atol=1e-5)


def test_shared_delta_mode_gives_one_delta_per_loop(tiny_llama, tiny_tok, more_requests, context_templates,
                                                    ece_hparams):
    hp = ece_hparams("llama", v_num_grad_steps=5, v_stop_loss=1e-9)
    shared = compute_target_values(tiny_llama, tiny_tok, more_requests, hp, context_templates, z_layer=2,
                                   loops=[[0, 1], [2, 3]], shared_delta=True)
    deltas = shared.targets - shared.initial
    assert torch.allclose(deltas[0], deltas[1]) and torch.allclose(deltas[2], deltas[3])
    assert not torch.allclose(deltas[0], deltas[2])
    assert deltas.norm(dim=1).min() > 0
    # The clamp holds against the smallest ||h|| of the loop.
    for loop in ([0, 1], [2, 3]):
        limit = hp.clamp_norm_factor * shared.initial[loop].norm(dim=1).min()
        assert deltas[loop[0]].norm() <= limit * (1 + 1e-5)


# -- the round ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_columns_outside_the_selection_are_unchanged(arch, request, tiny_tok, stats_dir, more_requests, ece_hparams,
                                                     fixed_context):
    """The explanation reports the sets the solves used; a refinement pass keeps the main pass's sets."""
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = ece_hparams(arch, neuron_threshold=0.5, max_iterations=2, alpha=0.0, upper_bound=1e9)
    before = {l: read_weight(model, hp.rewrite_module(l)).clone() for l in hp.layers}
    state = SequentialState()
    report = apply_ece_to_model(model, tiny_tok, more_requests, hp, fixed_context(), state, method="AS")
    explanation = report.explanation
    assert explanation["refinement"] and explanation["scored_after_update"]
    for l in hp.layers:
        change = (read_weight(model, hp.rewrite_module(l)) - before[l]).abs().sum(0)
        chosen = torch.tensor(explanation["layers"][str(l)]["selected_neurons"])
        outside = torch.ones(len(change), dtype=torch.bool)
        outside[chosen] = False
        assert 0 < len(chosen) < len(change)
        assert (change[outside] == 0).all() and (change[chosen] > 0).all()
    # C_prev absorbs the keys of every neuron, not only the selected ones.
    assert (state.prev_moment(hp.layers[0]).diagonal() > 0).all()
    assert {r["case_id"] for r in explanation["requests"]} == {0, 1, 2, 3}
    assert sum(c["size"] for c in explanation["clusters"]) == 4
    assert set(report.seconds) >= {"explain", "cluster", "target_values", "update"}


@pytest.mark.parametrize("after_update", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_threshold_one_is_sequential_memit(arch, after_update, request, tiny_tok, stats_dir, more_requests,
                                           edit_requests, ece_hparams, fixed_context, make_hparams):
    """neuron_threshold = 1.0 selects every neuron, so two ECE rounds equal two MEMIT_seq rounds with one
    target loop per round: same weights and same C_prev, bit for bit, wherever the layers are scored."""
    model = request.getfixturevalue(f"tiny_{arch}")
    twin = copy.deepcopy(model)
    original = read_weight(model, "transformer.h.1.mlp.c_proj" if arch == "gpt2" else "model.layers.1.mlp.down_proj").clone()
    ece_hp = ece_hparams(arch, neuron_threshold=1.0, v_num_grad_steps=6, score_layers_after_update=after_update)
    memit_hp = make_hparams(arch, v_num_grad_steps=6, z_requests_per_loop=len(edit_requests))
    ece_state, memit_state = SequentialState(), SequentialState()
    for round_requests in (edit_requests, more_requests[3:]):
        report = apply_ece_to_model(model, tiny_tok, round_requests, ece_hp, fixed_context(), ece_state, method="GA")
        apply_memit_to_model(twin, tiny_tok, round_requests, memit_hp, fixed_context(), memit_state)
        assert report.explanation["n_clusters"] == 1
    for l in ece_hp.layers:
        assert torch.equal(read_weight(model, ece_hp.rewrite_module(l)), read_weight(twin, ece_hp.rewrite_module(l)))
        assert torch.equal(ece_state.prev_moment(l), memit_state.prev_moment(l))
    assert not torch.equal(read_weight(model, ece_hp.rewrite_module(1)), original)


def selections_on_the_partly_updated_model(original, edited, tok, requests, hp, templates, method):
    """Each layer's set recomputed on a copy of ``original`` whose earlier layers carry ``edited``'s weights:
    the model as MEMIT's layer loop has it just before that layer's solve."""
    twin, sets = copy.deepcopy(original), {}
    for l in hp.layers:
        scores = neuron_scores(twin, tok, requests, hp, templates, method, layers=[l])[l]
        sets[l] = select_neurons(scores.sum(0), hp.neuron_threshold).tolist()
        get_module(twin, hp.rewrite_module(l)).weight.copy_(get_module(edited, hp.rewrite_module(l)).weight)
    return sets


@pytest.mark.parametrize("arch,method", [("gpt2", "AS"), ("llama", "AS"), ("llama", "RS"), ("gpt2", "GA")])
def test_each_layer_is_scored_after_the_earlier_layers_update(arch, method, request, tiny_tok, stats_dir, more_requests,
                                                              context_templates, ece_hparams, fixed_context):
    """By default layer l's set is scored on the model whose layers before l carry the round's update, as
    upstream ECE-AS/RS score inside MEMIT's layer loop (AS_main.py:113-125, RS_main.py:113-137);
    score_layers_after_update=False keeps the sets scored once before any update."""
    model = request.getfixturevalue(f"tiny_{arch}")
    original, once = copy.deepcopy(model), copy.deepcopy(model)
    hp = ece_hparams(arch, layers=[0, 1, 2], neuron_threshold=0.5, v_num_grad_steps=4)
    assert hp.score_layers_after_update  # the default
    after = apply_ece_to_model(model, tiny_tok, more_requests, hp, fixed_context(), None, method=method).explanation
    before = apply_ece_to_model(once, tiny_tok, more_requests, replace(hp, score_layers_after_update=False),
                                fixed_context(), None, method=method).explanation
    used = lambda explanation: {l: explanation["layers"][str(l)]["selected_neurons"] for l in hp.layers}
    assert after["scored_after_update"] and not before["scored_after_update"]
    assert used(after) == selections_on_the_partly_updated_model(original, model, tiny_tok, more_requests, hp,
                                                                 context_templates, method)
    scored_once = neuron_scores(original, tiny_tok, more_requests, hp, context_templates, method)
    assert used(before) == {l: select_neurons(scores.sum(0), 0.5).tolist() for l, scores in scored_once.items()}
    # Nothing is updated before the first layer; the later layers' sets move with the earlier updates.
    assert used(after)[0] == used(before)[0]
    assert used(after)[1] != used(before)[1] and used(after)[2] != used(before)[2]
    for l in hp.layers:
        assert after["layers"][str(l)]["mass_share"] >= 0.5


def test_wi_is_the_same_scored_before_or_after_the_update(tiny_gpt2, tiny_tok, stats_dir, more_requests, edit_requests,
                                                          ece_hparams, fixed_context):
    """WI reads only the layer's own weight, which the earlier layers' updates leave alone: two sequential
    rounds with a refinement pass give the same weights, C_prev and sets either way, bit for bit."""
    twin = copy.deepcopy(tiny_gpt2)
    hp = ece_hparams("gpt2", layers=[0, 1, 2], neuron_threshold=0.5, v_num_grad_steps=4, max_iterations=2,
                     alpha=0.0, upper_bound=1e9)
    runs = [(tiny_gpt2, hp, SequentialState()), (twin, replace(hp, score_layers_after_update=False), SequentialState())]
    for round_requests in (edit_requests, more_requests[3:]):
        sets = []
        for model, run_hp, state in runs:
            explanation = apply_ece_to_model(model, tiny_tok, round_requests, run_hp, fixed_context(), state,
                                             method="WI").explanation
            assert explanation["refinement"] and not explanation["scored_after_update"]
            sets.append({l: info["selected_neurons"] for l, info in explanation["layers"].items()})
        assert sets[0] == sets[1] and all(0 < len(s) < 128 for s in sets[0].values())
    for l in hp.layers:
        assert torch.equal(read_weight(tiny_gpt2, hp.rewrite_module(l)), read_weight(twin, hp.rewrite_module(l)))
        assert torch.equal(runs[0][2].prev_moment(l), runs[1][2].prev_moment(l))


def test_refinement_reruns_only_requests_in_the_error_band(tiny_llama, tiny_tok, stats_dir, edit_requests, ece_hparams,
                                                           fixed_context):
    hp = ece_hparams("llama", max_iterations=3, alpha=0.0, upper_bound=1e9, mom2_update_weight=50.0)
    report = apply_ece_to_model(tiny_llama, tiny_tok, edit_requests, hp, fixed_context(), None, method="WI")
    passes = report.explanation["refinement"]
    assert len(passes) == 2 and all(set(p["case_ids"]) == {0, 1, 2} for p in passes)
    none = ece_hparams("llama", max_iterations=3, alpha=1e8, upper_bound=1e9)
    report = apply_ece_to_model(tiny_llama, tiny_tok, edit_requests, none, fixed_context(), None, method="WI")
    assert report.explanation["refinement"] == []


def with_relations(requests: list, relations: list) -> list:
    return [{**request, "relation_id": relation} for request, relation in zip(requests, relations)]


def test_cluster_by_decides_which_requests_share_a_loop(tiny_llama, tiny_tok, more_requests, context_templates,
                                                        ece_hparams):
    """The controls replace only the grouping: "relation" groups by relation_id, "single" makes one loop,
    "shuffled" gives the neuron clusters' sizes to random members; "neurons", the default, is the spectral
    clustering of the requests' own sets."""
    requests = with_relations(more_requests, ["P17", "P36", "P17", "P36"])

    def plan(**overrides):
        hp = ece_hparams("llama", neuron_threshold=0.5, n_clusters=2, **overrides)
        ece = ECERound(tiny_llama, tiny_tok, requests, hp, "AS", seed=3)
        return ece, ece.plan_loops(context_templates, {})

    neurons, loops = plan()
    assert neurons.hparams.cluster_by == "neurons"
    width = read_weight(tiny_llama, neurons.hparams.rewrite_module(1)).shape[1]
    expected = cluster_requests(neurons.own_sets, n_clusters=2, max_clusters=4, seed=3, width=width)
    assert neurons.labels.tolist() == expected.tolist() and len(set(expected.tolist())) == 2
    assert loops == optimisation_loops(expected, None)
    shuffled, loops = plan(cluster_by="shuffled")
    assert shuffled.labels.tolist() == shuffled_clusters(expected, 3).tolist()
    assert sorted(np.bincount(shuffled.labels)) == sorted(np.bincount(expected))
    assert loops == optimisation_loops(shuffled.labels, None)
    relation, loops = plan(cluster_by="relation")
    assert relation.labels.tolist() == [0, 1, 0, 1] and loops == [[0, 2], [1, 3]]
    for z_mode in ("per_request", "shared"):
        single, loops = plan(cluster_by="single", z_mode=z_mode)
        assert single.labels.tolist() == [0, 0, 0, 0] and loops == [[0, 1, 2, 3]]


def test_explanation_records_cluster_by_and_the_relations_of_each_cluster(tiny_llama, tiny_tok, stats_dir, tmp_path,
                                                                          more_requests, ece_hparams, fixed_context):
    """...and summarize.py's --explain view reads what the round writes."""
    import summarize

    requests = with_relations(more_requests, ["P17", "P36", "P17", "P36"])
    hp = ece_hparams("llama", cluster_by="relation", v_num_grad_steps=3)
    explanation = apply_ece_to_model(tiny_llama, tiny_tok, requests, hp, fixed_context(), None,
                                     method="WI").explanation
    assert explanation["cluster_by"] == "relation" and explanation["n_clusters"] == 2
    assert [(c["case_ids"], c["relations"]) for c in explanation["clusters"]] == \
        [([0, 2], {"P17": 2}), ([1, 3], {"P36": 2})]
    assert [r["cluster"] for r in explanation["requests"]] == [0, 1, 0, 1]
    path = tmp_path / "explanation_round_000.json"
    summary = summarize.explain_round({"round": 0, **explanation}, path)
    assert summary["cluster_by"] == "relation" and [c["relations"] for c in summary["clusters"]] == \
        [{"P17": 2}, {"P36": 2}]
    first = [c["top_neurons"]["1"][0] for c in summary["clusters"]]
    assert first[0] == first[1] and first[0][1] == 2  # WI: every request has the same top neurons
    assert summarize.plot_explanation({"round": 0, **explanation}, path.with_suffix(".png")).stat().st_size > 0
    # WI's identical sets make one neuron cluster; a request without relation_id is left out of the counts.
    requests[2].pop("relation_id")
    explanation = apply_ece_to_model(tiny_llama, tiny_tok, requests, replace(hp, cluster_by="neurons"),
                                     fixed_context(), None, method="WI").explanation
    assert explanation["cluster_by"] == "neurons"
    assert [c["relations"] for c in explanation["clusters"]] == [{"P36": 2, "P17": 1}]


def test_cluster_by_relation_refuses_requests_without_relation_id(tiny_llama, tiny_tok, stats_dir, more_requests,
                                                                  ece_hparams, fixed_context):
    """EasyEdit records and the API's requests may have no relation_id: one clear error before any work."""
    requests = with_relations(more_requests, ["P17", "P36", None, "P36"])
    before = read_weight(tiny_llama, "model.layers.1.mlp.down_proj").clone()
    with pytest.raises(RequestError, match=r"request 2 \(subject 'Miles Davis'\), case_id 2: no relation_id.*"
                                           r"use cluster_by \"neurons\""):
        apply_ece_to_model(tiny_llama, tiny_tok, requests, ece_hparams("llama", cluster_by="relation"),
                           fixed_context(), None, method="WI")
    assert torch.equal(read_weight(tiny_llama, "model.layers.1.mlp.down_proj"), before)
    assert not stats_dir.exists()  # refused before the statistics


def test_hparams_errors_name_the_key(ece_hparams):
    with pytest.raises(HParamsError, match="z_mode"):
        ece_hparams("llama", z_mode="together")
    with pytest.raises(HParamsError, match="neuron_threshold"):
        ece_hparams("llama", neuron_threshold=0.0)
    with pytest.raises(HParamsError, match="upper_bound"):
        ece_hparams("llama", alpha=2.0, upper_bound=1.0)
    with pytest.raises(HParamsError, match="key 'cluster_by' must be one of"):
        ece_hparams("llama", cluster_by="relations")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("bos", [False, True])
def test_prefix_cache_gives_the_same_target_values(arch, bos, request, more_requests, context_templates, ece_hparams):
    """Tokens before the fact token are computed once; the values must not change."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok_bos" if bos else "tiny_tok")
    threshold_hp = ece_hparams(arch, v_num_grad_steps=1)
    first = compute_target_values(model, tok, more_requests, threshold_hp, context_templates, z_layer=2).losses
    hp = ece_hparams(arch, v_num_grad_steps=6, v_stop_loss=float(np.median(first)))  # some stop, some go on
    full = compute_target_values(model, tok, more_requests, replace(hp, z_below_cache=False), context_templates,
                                 z_layer=2, prefix_cache=False)
    for prefix_cache, below_cache in [(True, False), (False, True), (True, True)]:
        cached = compute_target_values(model, tok, more_requests, replace(hp, z_below_cache=below_cache),
                                       context_templates, z_layer=2, prefix_cache=prefix_cache)
        assert torch.allclose(cached.initial, full.initial, rtol=1e-4, atol=1e-5)
        assert torch.allclose(cached.targets, full.targets, rtol=1e-4, atol=1e-5)
        assert cached.steps == full.steps and len(set(cached.steps)) > 1
        assert cached.losses == pytest.approx(full.losses, rel=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layers_below_the_edit_run_once_per_loop(arch, request, more_requests, context_templates, ece_hparams):
    """With z_below_cache the layers up to z_layer run once per loop, the layers above once per step;
    the skipped modules' own forward comes back afterwards."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok")
    hp = ece_hparams(arch, v_num_grad_steps=4, v_stop_loss=0.0)  # every request runs every step
    layer = lambda i: get_module(model, hp.layer_module(i))
    calls = {i: 0 for i in (0, 2, 3)}
    counters = [get_module(model, hp.rewrite_module_tmp.format(i)).register_forward_hook(
        lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)) for i in calls]
    try:
        for below_cache in (True, False):
            calls.update({i: 0 for i in calls})
            compute_target_values(model, tok, more_requests, replace(hp, z_below_cache=below_cache), context_templates,
                                  z_layer=2, requests_per_loop=2)
            loops = -(-len(more_requests) // 2)
            # one pass over the shared contexts; per loop the prefix pass, then (with the cache) one
            # recording pass, or else one pass per step
            below = 1 + loops * (2 if below_cache else 1 + hp.v_num_grad_steps)
            assert calls == {0: below, 2: below, 3: 1 + loops * (1 + hp.v_num_grad_steps)}
            assert all("forward" not in layer(i).__dict__ for i in range(3))
    finally:
        for counter in counters:
            counter.remove()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_compiled_layers_give_the_same_target_values(arch, request, more_requests, context_templates, ece_hparams):
    """z_compile runs the layers of every step as compiled code: the values, steps and losses of eager code up
    to float rounding, through the caches and shrinking batches, and the layers' own forward afterwards."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok")
    first = compute_target_values(model, tok, more_requests, ece_hparams(arch, v_num_grad_steps=1), context_templates,
                                  z_layer=2).losses
    hp = ece_hparams(arch, v_num_grad_steps=6, v_stop_loss=float(np.median(first)))  # some stop, some go on
    eager = compute_target_values(model, tok, more_requests, hp, context_templates, z_layer=2, requests_per_loop=3)
    from torch._dynamo.utils import counters

    counters.clear()
    for below_cache in (True, False):
        compiled = compute_target_values(model, tok, more_requests, replace(hp, z_compile=True,
                                         z_below_cache=below_cache), context_templates, z_layer=2, requests_per_loop=3)
        assert torch.allclose(compiled.targets, eager.targets, rtol=1e-4, atol=1e-5)
        assert compiled.steps == eager.steps and len(set(eager.steps)) > 1
        assert compiled.losses == pytest.approx(eager.losses, rel=1e-4)
    assert counters["stats"]["unique_graphs"] > 0  # compiled code ran, not an eager fallback
    assert all("forward" not in get_module(model, hp.layer_module(i)).__dict__ for i in range(4))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_low_precision_target_loop_keeps_the_unedited_values(arch, request, more_requests, context_templates,
                                                             ece_hparams):
    """z_dtype=bfloat16 runs the products of the layers above the edit in bfloat16: the unedited values at the
    edit are float32-exact, the optimised shifts and losses move by bfloat16 rounding (not more), and the
    model's weights are untouched."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok")
    hp = ece_hparams(arch, v_num_grad_steps=6, v_stop_loss=0.0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    exact = compute_target_values(model, tok, more_requests, hp, context_templates, z_layer=2, requests_per_loop=3)
    low = compute_target_values(model, tok, more_requests, replace(hp, z_dtype="bfloat16"), context_templates,
                                z_layer=2, requests_per_loop=3)
    assert low.targets.dtype == torch.float32 and torch.equal(low.initial, exact.initial)
    shift_exact, shift_low = exact.targets - exact.initial, low.targets - low.initial
    relative = (shift_low - shift_exact).norm(dim=1) / shift_exact.norm(dim=1)
    assert float(relative.max()) < 0.1 and float(relative.max()) > 1e-5
    assert low.losses == pytest.approx(exact.losses, rel=1e-2) and low.steps == exact.steps
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    with pytest.raises(HParamsError, match="z_dtype"):
        replace(hp, z_dtype="int8").validate("test")


def test_automatic_product_dtype_follows_the_device(tiny_llama, monkeypatch):
    """z_dtype=auto: bfloat16 products for a float32 model where the device multiplies bfloat16 natively,
    the model's own precision elsewhere and for a model that is not float32; null never changes it."""
    import editing.target_values as target_values

    for fast in (True, False):
        monkeypatch.setattr(target_values, "fast_bfloat16", lambda device, fast=fast: fast)
        assert target_values.products_dtype("auto", tiny_llama) == (torch.bfloat16 if fast else None)
        assert target_values.products_dtype(None, tiny_llama) is None
        assert target_values.products_dtype("float32", tiny_llama) is None
    half = copy.deepcopy(tiny_llama).to(torch.bfloat16)
    monkeypatch.setattr(target_values, "fast_bfloat16", lambda device: True)
    assert target_values.products_dtype("auto", half) is None
    assert target_values.products_dtype("float32", half) == torch.float32


PAPER_VALUES = {  # DESIGN.md / the ECE paper: layers, lambda, v_lr, steps, loss layer
    "gpt2-xl": ([13, 14, 15, 16, 17], 20000, 0.5, 20, 47),
    "Llama3-8B": ([4, 5, 6, 7, 8], 15000, 0.1, 25, 31),
}


@pytest.mark.parametrize("method", ["WI", "AS", "RS", "GA"])
def test_shipped_ece_hparams_load_with_the_paper_values(method):
    from pathlib import Path

    from experiments.algorithms import get_algorithm

    algorithm = get_algorithm(f"ECE_{method}")
    assert algorithm.sequential_by_default and algorithm.uses_sequential_state
    assert algorithm.hparams_dir_name == "ECE"  # one folder for the four neuron scores
    folder = Path(__file__).resolve().parent.parent / "hparams" / algorithm.hparams_dir_name
    for model, (layers, lam, lr, steps, loss_layer) in PAPER_VALUES.items():
        hp = algorithm.hparams_class.from_json(folder / f"{model}.json")
        assert (hp.layers, hp.mom2_update_weight, hp.v_lr, hp.v_num_grad_steps, hp.v_loss_layer) == \
            (layers, lam, lr, steps, loss_layer)
        assert (hp.clamp_norm_factor, hp.kl_factor, hp.v_weight_decay, hp.neuron_threshold) == (0.75, 0.0625, 0.5, 0.8)
    small = algorithm.hparams_class.from_json(folder / "smollm2-135m.json")
    assert small.layers == [3, 4, 5, 6, 7] and small.mom2_update_weight == 1500  # tuned on 200 records


def test_gradient_attribution_matches_a_manual_unpadded_gradient(tiny_gpt2, tiny_tok_bos, edit_requests, ece_hparams):
    """Batched, left-padded GA equals |k * dlog p(true)/dk| computed for each prompt alone (GPT-2: absolute
    positions, so a padding mistake would show)."""
    from editing.keys import fact_token_index
    from util.hooks import Trace
    from util.tokens import prompt_ids, target_ids

    hp = ece_hparams("gpt2")
    templates = [["{}"]]
    batched = neuron_scores(tiny_gpt2, tiny_tok_bos, edit_requests, hp, templates, "GA")
    layer = hp.layers[0]
    for j, r in enumerate(edit_requests):
        prompt = prompt_ids(tiny_tok_bos, r["prompt"].format(r["subject"]))
        truth = target_ids(tiny_tok_bos, r["target_true"]["str"])
        fact = fact_token_index(tiny_tok_bos, r["prompt"], r["subject"], hp.fact_token)
        seen = {}

        def leaf(x):
            seen["x"] = x.detach().clone().requires_grad_(True)
            return seen["x"]

        with torch.enable_grad(), Trace(tiny_gpt2, hp.rewrite_module(layer), retain_output=False, edit_input=leaf):
            logits = tiny_gpt2(input_ids=torch.tensor([prompt + truth])).logits[0]
            log_probs = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(truth)], -1)
            total = log_probs.gather(1, torch.tensor(truth)[:, None]).sum()
            (grad,) = torch.autograd.grad(total, [seen["x"]])
        expected = (seen["x"][0, fact] * grad[0, fact]).abs()
        assert torch.allclose(batched[layer][j], expected, rtol=1e-3, atol=1e-7)
