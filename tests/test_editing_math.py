"""The shared editing machinery on tiny random models: statistics, target values, least squares."""

import pytest
import torch

from editing.context import EditContext
from editing.keys import compute_keys, states_at_fact_tokens
from editing.layer_stats import load_corpus_text, load_or_compute_second_moments, stats_file, text_chunks
from editing.target_values import chunks_by_width, compute_target_values, step_widths
from editing.update import least_squares_delta, spread_update_over_layers
from rome.rome_main import ROMEHyperParams, apply_rome_to_model
from util.tokens import prompt_ids, target_ids
from util.weights import read_weight

from baselines.memit import apply_memit_to_model


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


def test_second_moments_match_a_direct_computation_and_are_cached(tiny_gpt2, tiny_tok_bos, stats_dir, monkeypatch,
                                                                  make_hparams):
    hp = make_hparams("gpt2")
    result = load_or_compute_second_moments(tiny_gpt2, tiny_tok_bos, hp, [1, 2], "tiny-gpt2")
    chunks = text_chunks(tiny_tok_bos, load_corpus_text("wikitext"), 40, 32)
    assert chunks.shape == (40, 32) and (chunks[:, 0] == 1).all()  # BOS in front of every chunk
    name = hp.rewrite_module(2)
    from util.hooks import Trace

    with Trace(tiny_gpt2, name, retain_input=True, retain_output=False) as t:
        tiny_gpt2(input_ids=chunks)
    # Every position counts, the BOS included, as upstream layer_stats does.
    keys = t.input.reshape(-1, t.input.shape[-1]).double()
    assert torch.allclose(result[2].double(), keys.T @ keys / len(keys), rtol=1e-4, atol=1e-6)
    # mom2_skip_bos leaves the BOS position out, in a file of its own.
    skip = make_hparams("gpt2", mom2_skip_bos=True)
    without = load_or_compute_second_moments(tiny_gpt2, tiny_tok_bos, skip, [2], "tiny-gpt2")[2].double()
    body = t.input[:, 1:].reshape(-1, t.input.shape[-1]).double()
    assert torch.allclose(without, body.T @ body / len(body), rtol=1e-4, atol=1e-6)
    assert not torch.allclose(without, result[2].double(), rtol=1e-3)
    assert stats_file(stats_dir, "tiny-gpt2", skip, 2) != stats_file(stats_dir, "tiny-gpt2", hp, 2)
    path = stats_file(stats_dir, "tiny-gpt2", hp, 2)
    assert path.exists() and not list(path.parent.glob(".*tmp"))
    # A second call reads the cache and never runs the model.
    monkeypatch.setattr("editing.layer_stats.compute_second_moments", lambda *a, **k: pytest.fail("recomputed"))
    again = load_or_compute_second_moments(tiny_gpt2, tiny_tok_bos, hp, [1, 2], "tiny-gpt2")
    assert torch.equal(again[1], result[1])
    # Another sample count is another file.
    assert stats_file(stats_dir, "tiny-gpt2", make_hparams("gpt2", mom2_n_samples=41), 2) != path


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batched_target_values_equal_one_request_at_a_time(request, arch, tiny_tok, edit_requests, context_templates,
                                                           make_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch)
    together = compute_target_values(model, tiny_tok, edit_requests, hp, context_templates, z_layer=2)
    alone = compute_target_values(model, tiny_tok, edit_requests, hp, context_templates, z_layer=2, requests_per_loop=1)
    assert together.loops == 1 and alone.loops == 3
    assert together.steps == alone.steps
    assert torch.allclose(together.targets, alone.targets, atol=1e-4, rtol=1e-4)
    assert torch.allclose(together.initial, alone.initial, atol=1e-5)
    # The clamp bounds every delta.
    norms = (together.targets - together.initial).norm(dim=1)
    assert (norms <= hp.clamp_norm_factor * together.initial.norm(dim=1) + 1e-4).all()


def test_chunks_by_width_puts_rows_of_like_width_together():
    widths = [5, 2, 5, 3, 2, 4]
    assert chunks_by_width(range(6), widths, 2) == [[1, 4], [3, 5], [0, 2]]
    assert chunks_by_width([5, 0, 3], widths, 3) == [[5, 0, 3]]  # one loop: the order as given
    assert chunks_by_width([5, 0, 3], widths, None) == [[5, 0, 3]]
    assert chunks_by_width([], widths, 2) == []
    assert chunks_by_width(range(6), None, 4) == [[0, 1, 2, 3], [4, 5]]  # no widths: the order as given


def test_step_widths_count_the_tokens_from_the_fact_token_on(tiny_tok):
    requests = [{"prompt": "{} plays the", "subject": "Miles Davis", "target_new": {"str": "piano music"}},
                {"prompt": "{} is in", "subject": "Paris", "target_new": {"str": "Rome"}}]
    widths = step_widths(tiny_tok, requests, "subject_last")
    for request, width in zip(requests, widths):
        prompt = prompt_ids(tiny_tok, request["prompt"].format(request["subject"]))
        through_subject = prompt_ids(tiny_tok, request["subject"])
        target = target_ids(tiny_tok, request["target_new"]["str"])
        # The subject's last token, the rest of the prompt, and every target token but the last.
        assert width == 1 + (len(prompt) - len(through_subject)) + len(target) - 1
    # Keyed on the prompt's last token: that token and the target's tokens but the last.
    target_lengths = [len(target_ids(tiny_tok, r["target_new"]["str"])) for r in requests]
    assert step_widths(tiny_tok, requests, "last") == target_lengths


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loops_of_a_size_group_requests_by_width_with_the_values_of_one_loop_each(request, arch, tiny_tok,
                                                                                  edit_requests, context_templates,
                                                                                  make_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch)
    requests = edit_requests + [{**edit_requests[0], "case_id": 3, "prompt": "{} is, as everyone knows, a citizen of"}]
    widths = step_widths(tiny_tok, requests, hp.fact_token)
    paired = compute_target_values(model, tiny_tok, requests, hp, context_templates, z_layer=2, requests_per_loop=2)
    alone = compute_target_values(model, tiny_tok, requests, hp, context_templates, z_layer=2, requests_per_loop=1)
    loops = [[i for i in range(len(requests)) if paired.loop_of[i] == k] for k in range(paired.loops)]
    assert loops == chunks_by_width(range(len(requests)), widths, 2)
    assert max(widths[i] for i in loops[0]) <= min(widths[i] for i in loops[1])
    assert loops != [[0, 1], [2, 3]]  # not the consecutive chunks
    assert paired.steps == alone.steps
    assert torch.allclose(paired.targets, alone.targets, atol=1e-4, rtol=1e-4)


def test_requests_stop_on_their_own(tiny_llama, tiny_tok, edit_requests, context_templates, make_hparams):
    first = compute_target_values(tiny_llama, tiny_tok, edit_requests, make_hparams("llama", v_num_grad_steps=1),
                                  context_templates, z_layer=2)
    assert first.steps == [0, 0, 0]
    ranked = sorted(first.losses)
    threshold = (ranked[0] + ranked[1]) / 2  # the easiest request is already below it
    hp = make_hparams("llama", v_num_grad_steps=8, v_stop_loss=threshold)
    values = compute_target_values(tiny_llama, tiny_tok, edit_requests, hp, context_templates, z_layer=2)
    easiest = first.losses.index(ranked[0])
    assert values.steps[easiest] == 0
    assert torch.allclose(values.targets[easiest], values.initial[easiest])  # its delta never moved
    assert all(values.steps[j] > 0 for j in range(3) if j != easiest)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_memit_update_moves_outputs_to_targets(request, arch, tiny_tok, stats_dir, edit_requests, context_templates,
                                               make_hparams):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch, mom2_update_weight=1e-4)
    targets = compute_target_values(model, tiny_tok, edit_requests, hp, context_templates, z_layer=2).targets
    second = load_or_compute_second_moments(model, tiny_tok, hp, hp.layers, f"tiny-{arch}")
    before = {l: read_weight(model, hp.rewrite_module(l)).clone() for l in hp.layers}
    solve = lambda layer, k, r: least_squares_delta(k, r, second[layer], hp.mom2_update_weight)
    record = spread_update_over_layers(model, tiny_tok, edit_requests, hp, targets, context_templates, solve)
    # Each layer's update maps its keys onto its share of the residual (tiny regulariser).
    for layer in hp.layers:
        change = read_weight(model, hp.rewrite_module(layer)) - before[layer]
        assert torch.allclose(change.double(), record.deltas[layer].to(change.dtype).double(), atol=1e-6)
    # With only the bare prompt as template, the keys are the prompts' own keys: after the last layer's
    # update the output at the last edited layer reaches the target (up to the tiny regulariser).
    model_copy_targets = targets
    bare = [["{}"]]
    record = spread_update_over_layers(model, tiny_tok, edit_requests, hp, model_copy_targets, bare, solve)
    _, out = states_at_fact_tokens(model, tiny_tok, [r["prompt"] for r in edit_requests],
                                   [r["subject"] for r in edit_requests], "subject_last",
                                   outputs_of=[hp.layer_module(2)])
    gap = (out[hp.layer_module(2)] - targets).norm(dim=1)
    assert (gap < 1e-2 * targets.norm(dim=1)).all(), gap


def test_other_layers_untouched_and_sequential_state(tiny_llama, tiny_tok, stats_dir, edit_requests, make_hparams):
    from editing.sequential import SequentialState

    hp = make_hparams("llama")
    other = read_weight(tiny_llama, hp.rewrite_module(0)).clone()
    state = SequentialState()
    context = EditContext("tiny-llama", seed=0)
    apply_memit_to_model(tiny_llama, tiny_tok, edit_requests[:2], hp, context, state)
    assert torch.equal(read_weight(tiny_llama, hp.rewrite_module(0)), other)
    keys = compute_keys(tiny_llama, tiny_tok, edit_requests[:2], hp, hp.layers, context.context_templates(
        tiny_llama, tiny_tok, hp.context_template_length_params))
    assert state.rounds == 1 and state.edits == 2
    assert torch.allclose(state.prev_moment(2), (keys[2].T @ keys[2]).double(), atol=1e-6)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_rome_target_value_lives_at_the_mlp_output(request, arch, tiny_tok, stats_dir, monkeypatch, edit_requests,
                                                   make_hparams):
    """rome/compute_v.py:79-87 adds the delta to the MLP output; the clamp and decay are scaled by its
    norm; k* is the flat mean over ROME's templates (compute_u.py:83-90); after the update the MLP output
    at the fact token of the bare prompt is the target."""
    import rome.rome_main as rome_main

    model = request.getfixturevalue(f"tiny_{arch}")
    hp = make_hparams(arch, cls=ROMEHyperParams, layers=[2], clamp_norm_factor=0.5)
    mlp = hp.mlp_module_tmp.format(2)
    rewrite = hp.rewrite_module(2)
    prompt, subject = edit_requests[0]["prompt"], edit_requests[0]["subject"]
    _, unedited = states_at_fact_tokens(model, tiny_tok, [prompt], [subject], "subject_last", outputs_of=[mlp])
    context = EditContext(f"tiny-{arch}")
    flat = [[t for g in context.context_templates(model, tiny_tok, hp.context_template_length_params, style="rome")
             for t in g]]
    assert len(flat[0]) == 21 and flat[0][0] == "{}"  # "{}" and 10 + 10 generated prefixes
    values = compute_target_values(model, tiny_tok, edit_requests[:1], hp, flat, 2, edit_module=mlp)
    assert torch.allclose(values.initial[0], unedited[mlp][0].float(), atol=1e-5)
    delta_norm = float((values.targets - values.initial).norm())
    assert 0 < delta_norm <= 0.5 * float(values.initial.norm()) + 1e-4  # clamped against ||MLP output||
    keys_seen = []
    real = rome_main.rank_one_delta
    monkeypatch.setattr(rome_main, "rank_one_delta", lambda k_avg, k, *a: keys_seen.append(k_avg) or real(k_avg, k, *a))
    apply_rome_to_model(model, tiny_tok, edit_requests[:1], hp, context)
    templates = [t.format(prompt) for t in flat[0]]
    inputs, _ = states_at_fact_tokens(model, tiny_tok, templates, [subject] * 21, "subject_last", inputs_of=[rewrite])
    # Keys of the rewrite module are its inputs, which the edit of that module does not change.
    assert torch.allclose(keys_seen[0], inputs[rewrite].mean(0), atol=1e-5)
    _, after = states_at_fact_tokens(model, tiny_tok, [prompt], [subject], "subject_last", outputs_of=[mlp])
    assert torch.allclose(after[mlp][0].float(), values.targets[0], atol=1e-3)


def test_statistics_stop_after_keys_per_dimension(tiny_llama, tiny_tok_bos, stats_dir, make_hparams):
    """``mom2_keys_per_dimension`` stops the statistics after that many keys per input dimension of the
    rewrite module, and caches them apart from the full statistics."""
    import torch as _torch

    hp = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32, mom2_keys_per_dimension=2.0)
    d_in = read_weight(tiny_llama, hp.rewrite_module(1)).shape[1]
    load_or_compute_second_moments(tiny_llama, tiny_tok_bos, hp, [1], "tiny-llama")
    saved = _torch.load(stats_file(stats_dir, "tiny-llama", hp, 1), weights_only=True)
    keys = saved["n_tokens"]  # the BOS column counts too
    assert 2 * d_in <= keys < 2 * d_in + 32 and keys < 40 * 32
    full = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32)
    assert stats_file(stats_dir, "tiny-llama", hp, 1) != stats_file(stats_dir, "tiny-llama", full, 1)


def test_edit_context_keeps_statistics_of_different_settings_apart(tiny_llama, tiny_tok_bos, stats_dir, make_hparams):
    """One run-scoped context serving two hparams that differ only in how many keys the statistics
    hold (the benchmark's ``ALG:key=value`` rows) returns two different C0."""
    context = EditContext("tiny-llama")
    full = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32)
    minimal = make_hparams("llama", mom2_n_samples=40, mom2_sample_length=32, mom2_keys_per_dimension=2.0)
    first = context.second_moments(tiny_llama, tiny_tok_bos, full, [1])[1]
    second = context.second_moments(tiny_llama, tiny_tok_bos, minimal, [1])[1]
    assert not torch.equal(first, second)
    assert context.second_moments(tiny_llama, tiny_tok_bos, full, [1])[1] is first  # from memory


def test_kl_term_is_current_against_unedited_as_memit_computes_it():
    """memit/compute_z.py:149-151: ``kl_div(kl_distr_init, kl_log_probs, log_target=True, reduction="batchmean")``
    is KL(p || p_0); the value and the gradient must match it, and differ from KL(p_0 || p)."""
    from editing.target_values import kl_to_unedited

    generator = torch.Generator().manual_seed(0)
    unedited = torch.log_softmax(torch.randn(1, 50, generator=generator), -1)
    logits = torch.randn(1, 50, generator=generator, requires_grad=True)
    ours = kl_to_unedited(torch.log_softmax(logits, -1), unedited).sum()
    (grad_ours,) = torch.autograd.grad(ours, logits)
    upstream = torch.nn.functional.kl_div(unedited, torch.log_softmax(logits, -1), log_target=True, reduction="batchmean")
    (grad_upstream,) = torch.autograd.grad(upstream, logits)
    assert float(ours.detach()) == pytest.approx(float(upstream.detach()), rel=1e-6)
    assert torch.allclose(grad_ours, grad_upstream, atol=1e-7)
    reverse = (unedited.exp() * (unedited - torch.log_softmax(logits, -1))).sum()
    assert abs(float(reverse.detach()) - float(upstream.detach())) > 1e-2


def test_target_loop_passes_the_current_distribution_first(tiny_llama, tiny_tok, monkeypatch, edit_requests,
                                                           context_templates, make_hparams):
    import editing.target_values as target_values

    calls = []
    real = target_values.kl_to_unedited
    monkeypatch.setattr(target_values, "kl_to_unedited",
                        lambda current, unedited: calls.append((current.requires_grad, unedited.requires_grad))
                        or real(current, unedited))
    compute_target_values(tiny_llama, tiny_tok, edit_requests[:1], make_hparams("llama", v_num_grad_steps=3),
                          context_templates, 2)
    assert calls and all(current and not unedited for current, unedited in calls)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sequential_memit_without_c_prev_is_plain_memit_round_after_round(request, arch, tiny_tok, stats_dir,
                                                                          edit_requests, make_hparams):
    """AlphaEdit's MEMIT row: edits kept between rounds, no C_prev (experiments/evaluate.py:245)."""
    import copy

    from editing.sequential import SequentialState

    model = request.getfixturevalue(f"tiny_{arch}")
    plain = copy.deepcopy(model)
    hp = make_hparams(arch, z_requests_per_loop=2)
    state, context, plain_context = SequentialState(track_prev_moments=False), EditContext("t"), EditContext("t")
    for round_requests in (edit_requests[:2], edit_requests[2:]):
        apply_memit_to_model(model, tiny_tok, round_requests, hp, context, state)
        apply_memit_to_model(plain, tiny_tok, round_requests, hp, plain_context)
    assert state.rounds == 2 and state.prev_moments == {}
    for layer in hp.layers:
        assert torch.allclose(read_weight(model, hp.rewrite_module(layer)), read_weight(plain, hp.rewrite_module(layer)))


@pytest.mark.parametrize("style", ["memit", "rome"])
def test_context_templates_count_tokens_as_generate_fast_does(tiny_gpt2, tiny_tok, monkeypatch, style):
    """generate_fast's ``max_out_len`` counts the prompt (util/generate.py:102 upstream): a length-10
    template of a one-token seed samples 9 new tokens. MEMIT seeds with five words and drops braces;
    ROME seeds with the document-start token (GPT-2's <|endoftext|>), 10 of each length."""
    import editing.context as context_module

    asked = []
    real = context_module.generate_texts
    monkeypatch.setattr(context_module, "generate_texts",
                        lambda model, tok, prompts, max_new_tokens, **kw: asked.append((list(prompts), max_new_tokens))
                        or real(model, tok, prompts, max_new_tokens, **kw))
    lengths = [[10, 5]] if style == "memit" else [[5, 10], [10, 10]]
    groups = context_module.generate_context_templates(tiny_gpt2, tiny_tok, lengths, seed=0, style=style)
    assert groups[0] == ["{}"] and [len(g) for g in groups[1:]] == [count for _, count in lengths]
    assert all(t.endswith(". {}") and t.count("{}") == 1 for g in groups[1:] for t in g)
    seeds = sorted(p for prompts, _ in asked for p in prompts)
    if style == "memit":
        assert seeds == sorted(["The", "Therefore", "Because", "I", "You"])
        assert all(n == 10 - len(prompt_ids(tiny_tok, p)) for prompts, n in asked for p in prompts)
    else:
        assert asked == [(["<bos>"] * 10, 4), (["<bos>"] * 10, 9)]
        assert all("<bos>" not in t for g in groups for t in g)
