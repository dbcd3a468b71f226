"""Most-probable early stopping of the target-value loop (``v_stop_most_probable_steps``)."""
import pytest
import torch

from editing.target_values import compute_target_values
from util.hparams import HParamsError

# Single-token targets right after the subject: a tiny random model can make them the most probable
# token (its final norm keeps every loss near log(vocab), so the loss rule alone never stops).
REQUESTS = [
    {"case_id": i, "prompt": prompt, "subject": subject, "target_new": {"str": target}, "target_true": {"str": " x"}}
    for i, (prompt, subject, target) in enumerate([
        ("The mother tongue of {}", "Danielle Darrieux", " and"),
        ("The city of {}", "Paris", " of"),
        ("The instrument of {}", "Miles Davis", " in"),
    ])
]
MAX_STEPS = 30


@pytest.fixture
def run_loop(tiny_llama, tiny_tok, make_hparams, context_templates):
    """Target values on the tiny Llama, at most ``steps`` steps, one loop per request unless told."""
    def run(requests, steps, requests_per_loop=1, **overrides):
        hp = make_hparams("llama", v_num_grad_steps=steps, **overrides)
        return compute_target_values(tiny_llama, tiny_tok, requests, hp, context_templates, z_layer=2,
                                     requests_per_loop=requests_per_loop)

    return run


def test_loss_rule_alone_runs_every_step(run_loop):
    values = run_loop(REQUESTS, MAX_STEPS)
    assert values.steps == [MAX_STEPS - 1] * len(REQUESTS)
    assert min(values.losses) > 1.0


@pytest.mark.parametrize("needed", [1, 2])
def test_a_request_stops_at_the_first_step_its_target_was_on_top_that_often(run_loop, needed):
    ruled = run_loop(REQUESTS, MAX_STEPS, v_stop_most_probable_steps=needed)
    assert all(0 < taken < MAX_STEPS - 1 for taken in ruled.steps), ruled.steps
    for j, taken in enumerate(ruled.steps):
        one = REQUESTS[j:j + 1]
        # Without the rule, exactly as many updates give the same value: stopping froze the delta.
        fixed = run_loop(one, taken + 1)
        assert torch.allclose(fixed.targets[0], ruled.targets[j], atol=1e-5)
        # With one update fewer allowed the rule had not fired yet: it stopped at its first chance.
        shorter = run_loop(one, taken, v_stop_most_probable_steps=needed)
        assert shorter.steps == [taken - 1]


def test_more_required_steps_never_stop_sooner(run_loop):
    once = run_loop(REQUESTS, MAX_STEPS, v_stop_most_probable_steps=1)
    twice = run_loop(REQUESTS, MAX_STEPS, v_stop_most_probable_steps=2)
    assert all(b > a for a, b in zip(once.steps, twice.steps))


def test_batched_loop_stops_each_request_as_alone(run_loop):
    together = run_loop(REQUESTS, MAX_STEPS, requests_per_loop=None, v_stop_most_probable_steps=2)
    alone = run_loop(REQUESTS, MAX_STEPS, v_stop_most_probable_steps=2)
    assert together.loops == 1 and together.steps == alone.steps
    assert torch.allclose(together.targets, alone.targets, atol=1e-4, rtol=1e-4)


def test_most_probable_steps_must_be_positive(make_hparams):
    with pytest.raises(HParamsError, match="v_stop_most_probable_steps"):
        make_hparams("llama", v_stop_most_probable_steps=0)


def _initial_nll(run_loop, request) -> float:
    """The request's NLL before any update: with one step allowed the loop never updates, so its loss is
    the NLL alone (KL and weight decay are zero at delta = 0)."""
    return run_loop([request], 1).losses[0]


def test_nll_rule_stops_a_request_at_the_first_step_its_nll_is_below(run_loop):
    # The tiny model's NLL falls a few percent in its first steps and then stalls.
    thresholds = [0.94 * _initial_nll(run_loop, request) for request in REQUESTS]
    taken_steps = []
    for j, threshold in enumerate(thresholds):
        one = REQUESTS[j:j + 1]
        ruled = run_loop(one, MAX_STEPS, v_stop_nll=threshold)
        taken = ruled.steps[0]
        taken_steps.append(taken)
        assert 0 < taken < MAX_STEPS - 1, ruled.steps
        # Without the rule, exactly as many updates give the same value: stopping froze the delta.
        fixed = run_loop(one, taken + 1)
        assert torch.allclose(fixed.targets[0], ruled.targets[0], atol=1e-5)
        shorter = run_loop(one, taken, v_stop_nll=threshold)
        assert shorter.steps == [taken - 1]
        # A looser threshold is reached no later, a stricter one no sooner.
        assert run_loop(one, MAX_STEPS, v_stop_nll=1.01 * threshold).steps[0] <= taken
        assert run_loop(one, MAX_STEPS, v_stop_nll=0.99 * threshold).steps[0] >= taken
    assert max(taken_steps) > 1, taken_steps


def test_nll_rule_in_a_batched_loop_stops_each_request_as_alone(run_loop):
    threshold = 0.93 * min(_initial_nll(run_loop, request) for request in REQUESTS)
    together = run_loop(REQUESTS, MAX_STEPS, requests_per_loop=None, v_stop_nll=threshold)
    alone = run_loop(REQUESTS, MAX_STEPS, v_stop_nll=threshold)
    assert together.loops == 1 and together.steps == alone.steps
    assert min(alone.steps) < MAX_STEPS - 1, alone.steps
    assert torch.allclose(together.targets, alone.targets, atol=1e-4, rtol=1e-4)


def test_nll_threshold_must_be_positive(make_hparams):
    with pytest.raises(HParamsError, match="v_stop_nll"):
        make_hparams("llama", v_stop_nll=0)
