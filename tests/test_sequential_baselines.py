"""AlphaEdit, PRUNE and RECT on tiny random models: null-space projector, bounded edits, sparse updates."""
import copy
import math

import pytest
import torch

from baselines.alphaedit import (
    AlphaEditHyperParams, alphaedit_solver, apply_alphaedit_to_model, load_or_compute_projectors, nullspace_projector,
    projector_file,
)
from baselines.memit import apply_memit_to_model
from baselines.prune import PRUNEHyperParams, apply_prune_to_model, restrain
from baselines.rect import RECTHyperParams, apply_rect_to_model, keep_top_relative_entries
from experiments.algorithms import get_algorithm
from editing.layer_stats import stats_file
from editing.sequential import SequentialState
from util.hparams import HParamsError
from util.paths import REPO_ROOT
from util.weights import add_to_weight, read_weight, snapshot_weights


def orthonormal(d: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return q


def edited_weights(model, hparams):
    return {layer: read_weight(model, hparams.rewrite_module(layer)).detach().double().clone()
            for layer in hparams.layers}


# -- AlphaEdit ------------------------------------------------------------------------------------

def test_nullspace_projector_annihilates_the_dominant_subspace():
    d = 16
    u = orthonormal(d, seed=0)
    eigenvalues = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.1] + [1e-3] * 10, dtype=torch.float64)
    c0 = (u * eigenvalues) @ u.T
    p = nullspace_projector(c0.float(), threshold=2e-2)
    dominant, null = u[:, :6], u[:, 6:]
    assert (p @ dominant).abs().max() < 1e-6
    assert torch.allclose(p @ null, null, atol=1e-6)
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T, atol=1e-12)
    assert float(p.trace()) == pytest.approx(10.0, abs=1e-9)
    # Every eigenvalue above the threshold: nothing is free to change.
    assert float(nullspace_projector(c0, threshold=1e-4).abs().max()) == 0.0


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_projector_of_real_statistics_is_cached_next_to_them(request, arch, tiny_tok, stats_dir, monkeypatch,
                                                             fixed_context, make_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch, cls=AlphaEditHyperParams, nullspace_threshold=1e-4)
    context = fixed_context()
    second_moments = context.second_moments(model, tiny_tok, hp, hp.layers)
    projectors = load_or_compute_projectors(model, hp, second_moments, context.model_name)
    for layer in hp.layers:
        c0 = second_moments[layer].double()
        eigenvalues, eigenvectors = torch.linalg.eigh(c0)
        dominant = eigenvectors[:, eigenvalues >= 1e-4]
        p = projectors[layer].double()
        assert 0 < dominant.shape[1] < c0.shape[0]
        assert (p @ dominant).norm() < 1e-5 * dominant.norm()
        assert torch.allclose(p @ p, p, atol=1e-5) and torch.allclose(p, p.T, atol=1e-6)
        assert float(p.trace()) == pytest.approx(c0.shape[0] - dominant.shape[1], abs=1e-3)
        path = projector_file(stats_dir, "tiny", hp, layer)
        assert path.exists() and "0.0001" in path.name and not list(path.parent.glob(".*tmp"))
        assert path.parent == stats_file(stats_dir, "tiny", hp, layer).parent
    # The second call reads the files and never decomposes C0.
    monkeypatch.setattr("baselines.alphaedit.alphaedit_main.nullspace_projector",
                        lambda *a, **k: pytest.fail("the projector was recomputed"))
    again = load_or_compute_projectors(model, hp, second_moments, context.model_name)
    assert all(torch.equal(again[layer], projectors[layer]) for layer in hp.layers)
    other = make_hparams(arch, cls=AlphaEditHyperParams, nullspace_threshold=2e-4)
    assert projector_file(stats_dir, "tiny", other, 1) != projector_file(stats_dir, "tiny", hp, 1)


def test_alphaedit_solve_matches_its_equation_and_stays_in_the_null_space(make_hparams):
    d_in, d_out, n = 12, 5, 3
    generator = torch.Generator().manual_seed(1)
    u = orthonormal(d_in, seed=2)
    p = u[:, 4:] @ u[:, 4:].T  # the first 4 eigen-directions are preserved
    keys = torch.randn(d_in, n, generator=generator)
    residuals = torch.randn(d_out, n, generator=generator)
    prev_keys = torch.randn(d_in, 2, generator=generator, dtype=torch.float64)
    state = SequentialState(prev_moments={0: prev_keys @ prev_keys.T})
    hp = make_hparams("llama", cls=AlphaEditHyperParams, L2=0.5)
    delta = alphaedit_solver(hp, {0: p.float()}, state)(0, keys, residuals)
    assert delta.dtype == torch.float64 and delta.shape == (d_out, d_in)
    k = keys.double()
    lhs = (p @ (k @ k.T + state.prev_moments[0]) + 0.5 * torch.eye(d_in, dtype=torch.float64)) @ delta.T
    assert torch.allclose(lhs, p @ k @ residuals.double().T, atol=1e-6)
    assert (delta @ u[:, :4]).abs().max() < 1e-6 * delta.abs().max()
    # A smaller ridge fits the keys' null-space components more closely.
    loose = alphaedit_solver(make_hparams("llama", cls=AlphaEditHyperParams, L2=1e-6), {0: p}, None)(0, keys, residuals)
    target = residuals.double()
    assert (loose @ k - target).norm() < (delta @ k - target).norm()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_alphaedit_leaves_preserved_keys_alone_where_memit_does_not(request, arch, tiny_tok, stats_dir, edit_requests,
                                                                    fixed_context, make_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    memit_model = copy.deepcopy(model)
    probe = make_hparams(arch)
    second_moments = fixed_context().second_moments(model, tiny_tok, probe, probe.layers)
    # Half of the directions of each layer (at least) are free to change.
    threshold = min(float(torch.linalg.eigvalsh(c.double()).median()) for c in second_moments.values())
    hp = make_hparams(arch, cls=AlphaEditHyperParams, nullspace_threshold=threshold, L2=0.1,
                      mom2_update_weight=1.0, z_requests_per_loop=3)
    before = edited_weights(model, hp)
    state = SequentialState()
    report = apply_alphaedit_to_model(model, tiny_tok, edit_requests, hp, fixed_context(), state)
    apply_memit_to_model(memit_model, tiny_tok, edit_requests, make_hparams(arch, mom2_update_weight=1.0),
                         fixed_context())
    assert state.rounds == 1 and report.target_loops == 1
    for layer, weight in before.items():
        eigenvalues, eigenvectors = torch.linalg.eigh(second_moments[layer].double())
        preserved = eigenvectors[:, eigenvalues >= threshold]  # keys in the dominant span of C0
        alpha_change = edited_weights(model, hp)[layer] - weight
        memit_change = edited_weights(memit_model, hp)[layer] - weight
        unedited_outputs = (weight @ preserved).norm()
        assert alpha_change.norm() > 1e-2 * weight.norm()  # AlphaEdit did edit
        assert (alpha_change @ preserved).norm() < 1e-6 * unedited_outputs
        assert (memit_change @ preserved).norm() > 0.1 * unedited_outputs


def test_alphaedit_reads_its_projectors_once_per_run_and_per_threshold(tiny_gpt2, tiny_tok, stats_dir, monkeypatch,
                                                                       edit_requests, fixed_context, make_hparams):
    import baselines.alphaedit.alphaedit_main as alphaedit_main

    real, calls = alphaedit_main.load_or_compute_projectors, []
    monkeypatch.setattr(alphaedit_main, "load_or_compute_projectors",
                        lambda model, hp, *a, **k: calls.append(hp.nullspace_threshold) or real(model, hp, *a, **k))
    context, state = fixed_context(), SequentialState()
    hp = make_hparams("gpt2", cls=AlphaEditHyperParams, nullspace_threshold=1e-4, z_requests_per_loop=3)
    for _ in range(2):
        apply_alphaedit_to_model(tiny_gpt2, tiny_tok, edit_requests, hp, context, state)
    other = make_hparams("gpt2", cls=AlphaEditHyperParams, nullspace_threshold=2e-4, z_requests_per_loop=3)
    apply_alphaedit_to_model(tiny_gpt2, tiny_tok, edit_requests, other, context, state)
    assert state.rounds == 3 and calls == [1e-4, 2e-4]


# -- PRUNE ----------------------------------------------------------------------------------------

def test_restrain_on_known_singular_values():
    d_out, d_in = 6, 9
    w_orig = (orthonormal(d_out, 3)[:, :d_out] * torch.tensor([2.0, 1.5, 1.0, 0.5, 0.2, 0.1],
                                                              dtype=torch.float64)) @ orthonormal(d_in, 4)[:d_out]
    s_max = 2.0
    u, v = orthonormal(d_out, 5)[:, :3], orthonormal(d_in, 6)[:, :3]
    edit = (u * torch.tensor([10 * s_max, 3 * s_max, 0.5 * s_max], dtype=torch.float64)) @ v.T
    restrained = restrain(edit, w_orig)
    expected = torch.tensor([s_max + math.log(10), s_max + math.log(3), 0.5 * s_max], dtype=torch.float64)
    assert torch.allclose(torch.linalg.svdvals(restrained)[:3], expected, atol=1e-10)
    assert torch.linalg.svdvals(restrained)[3:].abs().max() < 1e-10
    # The directions of the edit are kept; only the large singular values shrink.
    assert torch.allclose(u.T @ restrained @ v, torch.diag(expected), atol=1e-10)
    # An edit already within the bound is left alone (and the storage orientation does not matter).
    small = 0.5 * edit / 10
    assert restrain(small, w_orig) is small  # untouched, not an SVD round trip: PRUNE then follows MEMIT to float32 rounding
    assert torch.allclose(restrain(edit.T, w_orig.T).T, restrained, atol=1e-10)


def _round_updates_spied(monkeypatch, names):
    """Record the raw MEMIT update of every round (the weights right before and after the MEMIT pass)."""
    import baselines.prune.prune_main as prune_main

    updates = []
    real = prune_main.locate_and_edit

    def spy(model, *args, after_update=None, **kwargs):
        before = snapshot_weights(model, names)

        def wrapped(record):
            after = snapshot_weights(model, names)
            updates.append({n: after[n].double() - before[n].double() for n in names})
            after_update(record)

        return real(model, *args, after_update=wrapped, **kwargs)

    monkeypatch.setattr(prune_main, "locate_and_edit", spy)
    return updates


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prune_over_three_rounds_equals_f_of_the_raw_sum(request, arch, tiny_tok, stats_dir, monkeypatch, edit_requests,
                                                         fixed_context, make_hparams):
    """W_orig + F(sum of raw updates), not F applied again to an already restrained edit (which would
    cap every large singular value at s_max); the rounds carry no C_prev."""
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch, cls=PRUNEHyperParams, z_requests_per_loop=2)
    names = [hp.rewrite_module(layer) for layer in hp.layers]
    unedited = snapshot_weights(model, names)
    updates = _round_updates_spied(monkeypatch, names)
    state, context = SequentialState(track_prev_moments=False), fixed_context()
    for round_index in range(3):
        report = apply_prune_to_model(model, tiny_tok, edit_requests[round_index:round_index + 1], hp, context, state)
    assert state.rounds == 3 and state.prev_moments == {} and len(updates) == 3
    assert sorted(report.extra["restrained_modules"]) == sorted(names)
    for name in names:
        assert torch.equal(state.originals[name], unedited[name])
        raw = sum(u[name] for u in updates)
        assert torch.allclose(state.raw_edits[name], raw, atol=1e-6)
        expected = unedited[name].double() + restrain(raw, unedited[name])
        assert torch.allclose(snapshot_weights(model, [name])[name].double(), expected, atol=1e-5)
        s_max = float(torch.linalg.matrix_norm(unedited[name].double(), ord=2))
        final = torch.linalg.svdvals(snapshot_weights(model, [name])[name].double() - unedited[name].double())
        # The random tiny weights are small, so the raw edit is far past s_max; its bound keeps growing
        # with it (log), where restraining the restrained edit again each round caps it near s_max.
        raw_top = float(torch.linalg.svdvals(raw)[0])
        assert raw_top > 10 * s_max
        assert float(final[0]) == pytest.approx(s_max + math.log(raw_top / s_max), rel=1e-4)


@pytest.mark.parametrize("arch", ["llama"])
def test_prune_after_the_last_round_applies_once(request, arch, tiny_tok, stats_dir, monkeypatch, edit_requests,
                                                 fixed_context, make_hparams):
    from baselines.prune import finish_prune

    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch, cls=PRUNEHyperParams, z_requests_per_loop=2, prune_schedule="after_last_round")
    names = [hp.rewrite_module(layer) for layer in hp.layers]
    unedited = snapshot_weights(model, names)
    state, context = SequentialState(track_prev_moments=False), fixed_context()
    for round_index in range(2):
        report = apply_prune_to_model(model, tiny_tok, edit_requests[round_index:round_index + 1], hp, context, state)
        assert report.extra["restrained_modules"] == []
    plain = snapshot_weights(model, names)
    for name in names:  # untouched until the end: the plain sequential MEMIT edit
        assert torch.allclose(plain[name].double(), unedited[name].double() + state.raw_edits[name], atol=1e-6)
    for name in names:  # make the raw edit large enough for F to act
        state.raw_edits[name] = 50 * state.raw_edits[name] / float(torch.linalg.matrix_norm(state.raw_edits[name], ord=2)) \
            * float(torch.linalg.matrix_norm(unedited[name].double(), ord=2))
    finish_prune(model, hp, state)
    assert state.finished
    for name in names:
        expected = unedited[name].double() + restrain(state.raw_edits[name], unedited[name])
        assert torch.allclose(snapshot_weights(model, [name])[name].double(), expected, atol=1e-5)
    before_second_call = snapshot_weights(model, names)
    finish_prune(model, hp, state)  # a resumed run never applies it twice
    assert all(torch.equal(before_second_call[n], snapshot_weights(model, [n])[n]) for n in names)


def test_sequential_state_keeps_originals_and_reads_old_files():
    state = SequentialState(prev_moments={1: torch.eye(2, dtype=torch.float64)}, rounds=3, edits=30,
                            originals={"m.1": torch.arange(6.0).view(2, 3)},
                            raw_edits={"m.1": torch.ones(2, 3, dtype=torch.float64)}, finished=True)
    restored = SequentialState.from_state_dict(state.state_dict())
    assert torch.equal(restored.originals["m.1"], state.originals["m.1"]) and restored.rounds == 3
    assert torch.equal(restored.raw_edits["m.1"], state.raw_edits["m.1"]) and restored.finished
    old_file = {"prev_moments": state.prev_moments, "rounds": 3, "edits": 30}  # written before ``originals``
    old = SequentialState.from_state_dict(old_file)
    assert old.originals == {} and old.raw_edits == {} and old.track_prev_moments and not old.finished


# -- RECT -----------------------------------------------------------------------------------------

def test_keep_top_relative_entries_on_a_known_example():
    delta = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0], [-0.15, 0.2, -0.3, 0.4, -0.5]])
    weight = torch.tensor([[1.0, 2.0, 4.0, 8.0, 10.0], [0.1, 0.1, 0.1, 0.1, 0.0]])
    # Relative magnitudes [1, .5, .25, .125, .1] and [1.5, 2, 3, 4, 5e7]. The reference keeps the entries
    # at or above the k-th smallest, k = int(10 * 60 / 100) = 6 for 40%: 1.5 and up, the second row.
    kept = keep_top_relative_entries(delta, weight, 40.0)
    assert torch.equal(kept, torch.tensor([[0.0, 0, 0, 0, 0], [-0.15, 0.2, -0.3, 0.4, -0.5]]))
    assert torch.count_nonzero(keep_top_relative_entries(delta, weight, 45.0)) == 6  # k = 5: 1 and up
    assert torch.count_nonzero(keep_top_relative_entries(delta, weight, 25.0)) == 4  # k = 7: 2 and up
    assert torch.equal(keep_top_relative_entries(delta, weight, 100.0), delta)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rect_applies_the_masked_final_update_of_an_unmasked_memit_pass(request, arch, tiny_tok, stats_dir,
                                                                        edit_requests, fixed_context, make_hparams):
    """memit_rect_main.py:40-61: MEMIT over all layers unmasked, weights restored, then each layer's final
    update masked against the weight before the round and added. No C_prev."""
    model = request.getfixturevalue(f"tiny_{arch}")
    memit_model = copy.deepcopy(model)
    hp = make_hparams(arch, cls=RECTHyperParams, top_k_percent=25.0, z_requests_per_loop=3)
    before = edited_weights(model, hp)
    state = SequentialState(track_prev_moments=False)
    report = apply_rect_to_model(model, tiny_tok, edit_requests, hp, fixed_context(), state)
    apply_memit_to_model(memit_model, tiny_tok, edit_requests, make_hparams(arch, z_requests_per_loop=3),
                         fixed_context())
    assert state.prev_moments == {} and state.rounds == 1
    for layer in hp.layers:
        memit_update = edited_weights(memit_model, hp)[layer] - before[layer]
        expected = keep_top_relative_entries(memit_update, before[layer], 25.0)
        change = edited_weights(model, hp)[layer] - before[layer]
        assert torch.allclose(change, expected, atol=1e-6)
        assert report.extra["kept_entries"][str(layer)] == int(torch.count_nonzero(expected))
        assert torch.count_nonzero(change) / change.numel() == pytest.approx(0.25, abs=0.01)
        relative = (memit_update / before[layer]).abs()
        assert relative[change != 0].min() >= relative[change == 0].max()


# -- hyperparameters and registry ------------------------------------------------------------------

@pytest.mark.parametrize("cls, key, value", [
    (AlphaEditHyperParams, "nullspace_threshold", 0.0),
    (AlphaEditHyperParams, "L2", -1.0),
    (AlphaEditHyperParams, "mom2_adjustment", False),
    (RECTHyperParams, "top_k_percent", 0.0),
    (RECTHyperParams, "top_k_percent", 100.5),
    (PRUNEHyperParams, "z_requests_per_loop", 0),
    (PRUNEHyperParams, "prune_schedule", "sometimes"),
])
def test_hparams_validation_names_the_bad_key(cls, key, value, make_hparams):
    with pytest.raises(HParamsError, match=f"'{key}'"):
        make_hparams("llama", cls=cls, **{key: value})


@pytest.mark.parametrize("name, extra", [("AlphaEdit", {"nullspace_threshold": 2e-2, "L2": 10.0}),
                                         ("MEMIT_prune", {}), ("MEMIT_rect", {"top_k_percent": 40.0})])
def test_registered_with_hparams_files_for_every_model(name, extra):
    algorithm = get_algorithm(name)
    assert algorithm.sequential_by_default and algorithm.uses_sequential_state
    # AlphaEdit experiments/evaluate.py:245: only AlphaEdit (with MEMIT_seq, NSE) gets the earlier keys.
    assert algorithm.keeps_prev_moments == (name == "AlphaEdit")
    for model in ("smollm2-135m", "gpt2-xl", "Llama3-8B"):
        hp = algorithm.hparams_class.from_json(REPO_ROOT / "hparams" / name / f"{model}.json")
        memit = get_algorithm("MEMIT").hparams_class.from_json(REPO_ROOT / "hparams" / "MEMIT" / f"{model}.json")
        assert {k: getattr(hp, k) for k in extra} == extra
        assert hp.layers == memit.layers and hp.v_lr == memit.v_lr
        assert hp.z_requests_per_loop == (20 if model == "smollm2-135m" else 1)


# -- Drift on generic text ------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_edit_drift_is_exact_on_constructed_edits(request, arch, tmp_path, make_hparams):
    """No edit: no change and the same perplexity. W -> (1 + eps) W: every key's output moves by exactly eps.
    A change orthogonal to every key moves nothing, although the weights changed."""
    from experiments.edit_drift import edit_drift, load_run
    from experiments.driver import RunError
    from util.hooks import TraceDict
    from util.weights import load_weights, weight_parameter

    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch)
    names = [hp.rewrite_module(layer) for layer in hp.layers]
    ids = torch.randint(0, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    stored = {name: weight_parameter(model, name).detach().clone() for name in names}

    same, scaled = edit_drift(model, ids, [stored, {n: 1.1 * w for n, w in stored.items()}], batch_size=2)
    assert all(v == 0.0 for v in same["relative_output_change"].values())
    assert same["perplexity_edited"] == pytest.approx(same["perplexity_unedited"], rel=1e-6)

    assert all(v == pytest.approx(0.1, rel=1e-6) for v in scaled["relative_output_change"].values())
    assert all(v == pytest.approx(0.1, rel=1e-6) for v in scaled["edit_spectral_ratio"].values())
    assert scaled["perplexity_edited"] != scaled["perplexity_unedited"]
    assert all(torch.equal(weight_parameter(model, n), w) for n, w in stored.items())  # put back

    # A rank-one change along a direction that none of these keys has: the weights move, the outputs do not.
    name = names[0]
    with TraceDict(model, [name], retain_input=True) as traces, torch.no_grad():
        model(input_ids=ids)
    keys = traces[name].input.flatten(0, -2).double()
    assert keys.shape[0] < keys.shape[1]
    unseen = torch.linalg.svd(keys, full_matrices=True).Vh[-1]
    delta = torch.ones(read_weight(model, name).shape[0], 1, dtype=torch.float64) @ unseen[None]
    add_to_weight(model, name, delta.float())
    moved = {name: weight_parameter(model, name).detach().clone()}
    load_weights(model, {name: stored[name]})
    (orthogonal,) = edit_drift(model, ids, [moved], batch_size=5)
    assert (moved[name] - stored[name]).abs().max() > 0.05
    assert orthogonal["relative_output_change"][name] < 1e-5

    with pytest.raises(RunError, match="sequential_state.pt"):
        load_run(tmp_path)
