"""Target loops spread over several devices (z_devices): the same values as one device, checked on the CPU
with two model copies in two threads, as they would run on two GPUs."""
import copy
from dataclasses import replace

import pytest
import torch

from baselines.memit import apply_memit_to_model
from editing.replicas import assign_loops, loop_devices, replicas_for, split_for_devices
from editing.sequential import SequentialState
from editing.target_values import compute_target_values
from util.hparams import HParamsError
from util.weights import read_weight

TWO_CPUS = ["cpu", "cpu"]


@pytest.fixture
def four_requests(edit_requests):
    return edit_requests + [
        {"case_id": 3, "prompt": "{} works in the field of", "subject": "Marie Curie",
         "target_new": {"str": "music"}, "target_true": {"str": "physics"}},
    ]


def test_loops_are_split_only_when_fewer_than_devices_and_only_with_own_deltas():
    assert split_for_devices([[0, 1, 2, 3, 4]], 2, splittable=True) == [[0, 1, 2], [3, 4]]
    assert split_for_devices([[0, 1, 2, 3, 4]], 2, splittable=False) == [[0, 1, 2, 3, 4]]
    assert split_for_devices([[0, 1], [2, 3]], 2, splittable=True) == [[0, 1], [2, 3]]
    assert split_for_devices([[0], [1, 2, 3]], 3, splittable=True) == [[0], [1], [2], [3]]


def test_loops_are_balanced_over_devices_by_requests():
    loops = [[0, 1, 2, 3], [4], [5, 6], [7, 8]]
    shares = assign_loops(loops, 2)
    loads = [sum(len(loops[k]) for k in share) for share in shares]
    assert sorted(k for share in shares for k in share) == [0, 1, 2, 3]
    assert loads == [5, 4]
    assert assign_loops([[0], [1]], 3) == [[0], [1], []]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_two_devices_give_the_values_of_one(arch, request, four_requests, context_templates, make_hparams):
    """Per-request deltas (the one loop is split between the two copies) and shared deltas (whole loops)."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok")
    hp = make_hparams(arch, v_num_grad_steps=5)
    one = compute_target_values(model, tok, four_requests, hp, context_templates, z_layer=2)
    two = compute_target_values(model, tok, four_requests, replace(hp, z_devices=TWO_CPUS), context_templates, z_layer=2)
    assert two.loops == 2 and one.loops == 1
    assert torch.allclose(two.targets, one.targets, atol=1e-6) and torch.allclose(two.initial, one.initial, atol=1e-6)
    assert two.steps == one.steps and two.losses == pytest.approx(one.losses, rel=1e-5)
    assert two.forward_tokens < one.forward_tokens * 1.01  # no request optimised twice
    loops = [[0, 3], [1, 2]]
    shared_one = compute_target_values(model, tok, four_requests, hp, context_templates, z_layer=2, loops=loops,
                                       shared_delta=True)
    shared_two = compute_target_values(model, tok, four_requests, replace(hp, z_devices=TWO_CPUS), context_templates,
                                       z_layer=2, loops=loops, shared_delta=True)
    assert torch.allclose(shared_two.targets, shared_one.targets, atol=1e-6)
    assert shared_two.loop_of == shared_one.loop_of == [0, 1, 1, 0]
    shift = shared_two.targets - shared_two.initial
    assert torch.allclose(shift[0], shift[3], atol=1e-6) and not torch.allclose(shift[0], shift[1], atol=1e-3)


def test_copies_follow_the_model_after_it_is_edited(tiny_llama, tiny_tok, four_requests, context_templates,
                                                    make_hparams, fixed_context, stats_dir):
    """The copies are kept between rounds and take the edited weights at every call: sequential MEMIT
    edits with two devices end with the weights of one device."""
    hp = make_hparams("llama", v_num_grad_steps=4, mom2_update_weight=1.0)
    twin = copy.deepcopy(tiny_llama)
    state, twin_state = SequentialState(), SequentialState()
    for round_requests in (four_requests[:2], four_requests[2:]):
        apply_memit_to_model(tiny_llama, tiny_tok, round_requests, hp, fixed_context(), state)
        apply_memit_to_model(twin, tiny_tok, round_requests, replace(hp, z_devices=TWO_CPUS), fixed_context(),
                             twin_state)
    for layer in hp.layers:
        name = hp.rewrite_module(layer)
        edited, twin_edited = read_weight(tiny_llama, name), read_weight(twin, name)
        assert torch.allclose(twin_edited, edited, atol=1e-5)
    (copy_,) = [m for m in replicas_for(twin, [torch.device("cpu"), torch.device("cpu")]) if m is not twin]
    for name, tensor in twin.state_dict().items():
        assert torch.equal(copy_.state_dict()[name], tensor), name  # refreshed, not the first round's copy
    assert not {p.data_ptr() for p in copy_.parameters()} & {p.data_ptr() for p in twin.parameters()}  # own memory
    values_now = compute_target_values(twin, tiny_tok, four_requests, replace(hp, z_devices=TWO_CPUS),
                                       context_templates, z_layer=2).targets
    values_one = compute_target_values(twin, tiny_tok, four_requests, hp, context_templates, z_layer=2).targets
    assert torch.allclose(values_now, values_one, atol=1e-6)


def test_bad_device_lists_are_refused_with_the_fix(tiny_llama, make_hparams):
    with pytest.raises(HParamsError, match="z_devices"):
        replace(make_hparams("llama"), z_devices=["gpu0"]).validate("test")
    with pytest.raises(HParamsError, match="z_compile"):
        replace(make_hparams("llama"), z_devices=TWO_CPUS, z_compile=True).validate("test")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="cuda:.*remove z_devices"):
            loop_devices(tiny_llama, ["cuda:0", "cuda:7"])
    assert loop_devices(tiny_llama, ["cpu"]) == [torch.device("cpu")]
