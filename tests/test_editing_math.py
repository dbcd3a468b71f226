"""The shared editing machinery on tiny random models: statistics, target values, least squares."""

import pytest
import torch

from rome.context import EditContext
from rome.fact_tokens import compute_keys, states_at_fact_tokens
from rome.layer_stats import load_corpus_text, load_or_compute_second_moments, stats_file, text_chunks
from rome.target_values import compute_target_values
from rome.update import least_squares_delta, spread_update_over_layers
from rome.rome_main import ROMEHyperParams, apply_rome_to_model
from util.weights import read_weight

from baselines.memit import MEMITHyperParams, apply_memit_to_model

ARCH = {
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 ln_f_module="transformer.ln_f"),
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  ln_f_module="model.norm"),
}
REQUESTS = [
    {"case_id": 0, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
     "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    {"case_id": 1, "prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
     "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    {"case_id": 2, "prompt": "{}, who plays the", "subject": "Miles Davis",
     "target_new": {"str": "piano"}, "target_true": {"str": "trumpet"}},
]
TEMPLATES = [["{}"], ["The history of the city. {}", "In the beginning. {}"]]


def make_hparams(arch, cls=MEMITHyperParams, **overrides):
    values = dict(layers=[1, 2], fact_token="subject_last", v_num_grad_steps=15, v_lr=0.5, v_loss_layer=3,
                  v_weight_decay=0.01, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=True,
                  mom2_dataset="wikitext", mom2_n_samples=40, mom2_sample_length=32, mom2_dtype="float32",
                  mom2_update_weight=1.0, **ARCH[arch])
    values.update(overrides)
    return cls.from_dict(values)


@pytest.fixture
def stats_dir(tmp_path, monkeypatch, data_dir):
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))
    return tmp_path / "stats"


def test_least_squares_delta_solves_the_normal_equations():
    torch.manual_seed(0)
    d_in, d_out, n = 12, 5, 4
    keys, residuals = torch.randn(d_in, n), torch.randn(d_out, n)
    c0 = torch.cov(torch.randn(d_in, 200)) + 0.1 * torch.eye(d_in)
    prev = torch.randn(d_in, 3) @ torch.randn(3, d_in)
    prev = prev @ prev.T
    delta = least_squares_delta(keys, residuals, c0, 2.0, prev)
    lhs = delta @ (2.0 * c0.double() + prev.double() + keys.double() @ keys.double().T)
    assert torch.allclose(lhs, residuals.double() @ keys.double().T, atol=1e-8)
    # With a vanishing regulariser the keys map exactly onto their residuals.
    exact = least_squares_delta(keys, residuals, c0, 1e-8)
    assert torch.allclose(exact @ keys.double(), residuals.double(), atol=1e-5)


def test_second_moments_match_a_direct_computation_and_are_cached(tiny_gpt2, tiny_tok_bos, stats_dir, monkeypatch):
    hp = make_hparams("gpt2")
    result = load_or_compute_second_moments(tiny_gpt2, tiny_tok_bos, hp, [1, 2], "tiny-gpt2")
    chunks = text_chunks(tiny_tok_bos, load_corpus_text("wikitext"), 40, 32)
    assert chunks.shape == (40, 32) and (chunks[:, 0] == 1).all()  # BOS in front of every chunk
    name = hp.rewrite_module(2)
    from util.hooks import Trace

    with Trace(tiny_gpt2, name, retain_input=True, retain_output=False) as t:
        tiny_gpt2(input_ids=chunks)
    keys = t.input[:, 1:].reshape(-1, t.input.shape[-1]).double()  # BOS position left out
    assert torch.allclose(result[2].double(), keys.T @ keys / len(keys), rtol=1e-4, atol=1e-6)
    path = stats_file(stats_dir, "tiny-gpt2", hp, 2)
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    # A second call reads the cache and never runs the model.
    monkeypatch.setattr("rome.layer_stats.compute_second_moments", lambda *a, **k: pytest.fail("recomputed"))
    again = load_or_compute_second_moments(tiny_gpt2, tiny_tok_bos, hp, [1, 2], "tiny-gpt2")
    assert torch.equal(again[1], result[1])
    # Another sample count is another file.
    assert stats_file(stats_dir, "tiny-gpt2", make_hparams("gpt2", mom2_n_samples=41), 2) != path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_target_values_equal_one_request_at_a_time(request, arch, tiny_tok):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch)
    together = compute_target_values(model, tiny_tok, REQUESTS, hp, TEMPLATES, z_layer=2)
    alone = compute_target_values(model, tiny_tok, REQUESTS, hp, TEMPLATES, z_layer=2, requests_per_loop=1)
    assert together.loops == 1 and alone.loops == 3
    assert together.steps == alone.steps
    assert torch.allclose(together.targets, alone.targets, atol=1e-4, rtol=1e-4)
    assert torch.allclose(together.initial, alone.initial, atol=1e-5)
    # The clamp bounds every delta.
    norms = (together.targets - together.initial).norm(dim=1)
    assert (norms <= hp.clamp_norm_factor * together.initial.norm(dim=1) + 1e-4).all()


def test_requests_stop_on_their_own(tiny_llama, tiny_tok):
    first = compute_target_values(tiny_llama, tiny_tok, REQUESTS, make_hparams("llama", v_num_grad_steps=1),
                                  TEMPLATES, z_layer=2)
    assert first.steps == [0, 0, 0]
    ranked = sorted(first.losses)
    threshold = (ranked[0] + ranked[1]) / 2  # the easiest request is already below it
    hp = make_hparams("llama", v_num_grad_steps=8, v_stop_loss=threshold)
    values = compute_target_values(tiny_llama, tiny_tok, REQUESTS, hp, TEMPLATES, z_layer=2)
    easiest = first.losses.index(ranked[0])
    assert values.steps[easiest] == 0
    assert torch.allclose(values.targets[easiest], values.initial[easiest])  # its delta never moved
    assert all(values.steps[j] > 0 for j in range(3) if j != easiest)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_update_moves_outputs_to_targets(request, arch, tiny_tok, stats_dir):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch, mom2_update_weight=1e-4)
    targets = compute_target_values(model, tiny_tok, REQUESTS, hp, TEMPLATES, z_layer=2).targets
    second = load_or_compute_second_moments(model, tiny_tok, hp, hp.layers, f"tiny-{arch}")
    before = {l: read_weight(model, hp.rewrite_module(l)).clone() for l in hp.layers}
    solve = lambda layer, k, r: least_squares_delta(k, r, second[layer], hp.mom2_update_weight)
    record = spread_update_over_layers(model, tiny_tok, REQUESTS, hp, targets, TEMPLATES, solve)
    # Each layer's update maps its keys onto its share of the residual (tiny regulariser).
    for layer in hp.layers:
        change = read_weight(model, hp.rewrite_module(layer)) - before[layer]
        assert torch.allclose(change.double(), record.deltas[layer].to(change.dtype).double(), atol=1e-6)
    # With only the bare prompt as template, the keys are the prompts' own keys: after the last layer's
    # update the output at the last edited layer reaches the target (up to the tiny regulariser).
    model_copy_targets = targets
    bare = [["{}"]]
    record = spread_update_over_layers(model, tiny_tok, REQUESTS, hp, model_copy_targets, bare, solve)
    _, out = states_at_fact_tokens(model, tiny_tok, [r["prompt"] for r in REQUESTS], [r["subject"] for r in REQUESTS],
                                   "subject_last", outputs_of=[hp.layer_module(2)])
    gap = (out[hp.layer_module(2)] - targets).norm(dim=1)
    assert (gap < 1e-2 * targets.norm(dim=1)).all(), gap


def test_other_layers_untouched_and_sequential_state(tiny_llama, tiny_tok, stats_dir):
    from rome.sequential import SequentialState

    hp = make_hparams("llama")
    other = read_weight(tiny_llama, hp.rewrite_module(0)).clone()
    state = SequentialState()
    context = EditContext("tiny-llama", seed=0)
    apply_memit_to_model(tiny_llama, tiny_tok, REQUESTS[:2], hp, context, state)
    assert torch.equal(read_weight(tiny_llama, hp.rewrite_module(0)), other)
    keys = compute_keys(tiny_llama, tiny_tok, REQUESTS[:2], hp, hp.layers, context.context_templates(
        tiny_llama, tiny_tok, hp.context_template_length_params))
    assert state.rounds == 1 and state.edits == 2
    assert torch.allclose(state.prev_moment(2), (keys[2].T @ keys[2]).double(), atol=1e-6)


def test_rome_rank_one_update_hits_the_target(tiny_gpt2, tiny_tok, stats_dir):
    hp = make_hparams("gpt2", cls=ROMEHyperParams, layers=[2])
    weight_before = read_weight(tiny_gpt2, hp.rewrite_module(2)).clone()
    context = EditContext("tiny-gpt2")
    values = compute_target_values(tiny_gpt2, tiny_tok, REQUESTS[:1], hp,
                                   context.context_templates(tiny_gpt2, tiny_tok, hp.context_template_length_params), 2)
    apply_rome_to_model(tiny_gpt2, tiny_tok, REQUESTS[:1], hp, context)
    change = read_weight(tiny_gpt2, hp.rewrite_module(2)) - weight_before
    assert torch.linalg.matrix_rank(change.double(), atol=1e-6) == 1
    _, out = states_at_fact_tokens(tiny_gpt2, tiny_tok, [REQUESTS[0]["prompt"]], [REQUESTS[0]["subject"]],
                                   "subject_last", outputs_of=[hp.layer_module(2)])
    assert torch.allclose(out[hp.layer_module(2)][0], values.targets[0], atol=1e-3)


def test_statistics_stop_after_keys_per_dimension(tiny_llama, tiny_tok_bos, stats_dir):
    """``mom2_keys_per_dimension`` stops the statistics after that many keys per input dimension of the
    rewrite module, and caches them apart from the full statistics."""
    import torch as _torch

    hp = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32, mom2_keys_per_dimension=2.0)
    d_in = read_weight(tiny_llama, hp.rewrite_module(1)).shape[1]
    load_or_compute_second_moments(tiny_llama, tiny_tok_bos, hp, [1], "tiny-llama")
    saved = _torch.load(stats_file(stats_dir, "tiny-llama", hp, 1), weights_only=True)
    keys = saved["n_tokens"] - saved["n_tokens"] // 32  # the BOS column holds no key
    assert 2 * d_in <= keys < 2 * d_in + 31 and keys < 40 * 31
    full = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32)
    assert stats_file(stats_dir, "tiny-llama", hp, 1) != stats_file(stats_dir, "tiny-llama", full, 1)


def test_edit_context_keeps_statistics_of_different_settings_apart(tiny_llama, tiny_tok_bos, stats_dir):
    """One run-scoped context serving two hparams that differ only in how many keys the statistics
    hold (the benchmark's ``ALG:key=value`` rows) returns two different C0."""
    context = EditContext("tiny-llama")
    full = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32)
    minimal = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32, mom2_keys_per_dimension=2.0)
    first = context.second_moments(tiny_llama, tiny_tok_bos, full, [1])[1]
    second = context.second_moments(tiny_llama, tiny_tok_bos, minimal, [1])[1]
    assert not torch.equal(first, second)
    assert context.second_moments(tiny_llama, tiny_tok_bos, full, [1])[1] is first  # from memory
