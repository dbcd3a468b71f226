"""FT / FT-L on tiny models: the shipped smollm2 settings edit, the L-infinity bound holds, and the loss,
stopping rule and parameter choice are the reference's (kmeng01/memit baselines/ft/ft_main.py:109-145)."""
import json

import pytest
import torch

from baselines.ft import FTHyperParams, apply_ft_to_model
from baselines.ft.ft_main import ft_loss
from util.hparams import HParamsError
from util.paths import REPO_ROOT
from util.weights import weight_parameter

FT_DIR = REPO_ROOT / "hparams" / "FT"


@pytest.fixture
def one_token(edit_requests):
    """The shared requests with one-token new targets for the tiny tokenizer, so that the FT loss is exactly
    -log p(target | prompt)."""
    return [{**r, "target_new": {"str": new}} for r, new in zip(edit_requests, ("German", "city", "song"))]


@pytest.fixture
def shipped(arch_modules):
    """``shipped(fname, arch="llama", layer=1, **overrides)``: a shipped smollm2 file's optimisation settings
    on a layer the 4-layer tiny model has."""
    def load(fname: str, arch: str = "llama", layer: int = 1, **overrides) -> FTHyperParams:
        values = json.loads((FT_DIR / fname).read_text())
        values.update(layers=[layer], rewrite_module_tmp=arch_modules[arch]["rewrite_module_tmp"], **overrides)
        return FTHyperParams.from_dict(values, source=fname)

    return load


def target_nll(model, tok, requests) -> torch.Tensor:
    """Per request: NLL of its new target's tokens right after the prompt (FT's loss of that request)."""
    with torch.no_grad():
        return torch.stack([ft_loss(model, tok, [r["prompt"].format(r["subject"])], [r["target_new"]["str"]], "cpu")
                            for r in requests])


def all_parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_ft_l_with_the_smollm2_settings_raises_the_target_and_keeps_the_bound(request, arch, tiny_tok, shipped,
                                                                              one_token):
    model = request.getfixturevalue(f"tiny_{arch}")
    hp = shipped("smollm2-135m.json", arch)
    assert hp.constrained and hp.norm_constraint > 0
    name = hp.rewrite_module_tmp.format(1)
    before, nll_before = all_parameters(model), target_nll(model, tiny_tok, one_token)
    report = apply_ft_to_model(model, tiny_tok, one_token, hp)
    gain = nll_before - target_nll(model, tiny_tok, one_token)
    # Every new target became more likely. The random tiny models react weakly to a bounded change, so the
    # margin is per architecture: the old bound (5e-4) moved these NLLs by at most 0.0033 (llama) and
    # 0.044 (gpt2), the shipped one by at least 0.025 and 0.44.
    assert bool((gain > {"llama": 0.02, "gpt2": 0.3}[arch]).all()), gain
    change = (weight_parameter(model, name).detach() - before[f"{name}.weight"]).abs()
    assert float(change.max()) <= hp.norm_constraint * (1 + 1e-5)
    assert float(change.max()) >= 0.99 * hp.norm_constraint  # the bound is reached: it is what limits the edit
    assert report.extra["ft_max_abs_change"] == pytest.approx(float(change.max()))
    # Only the weight moved (the reference would also train GPT-2's c_proj.bias; see ft_main's docstring).
    after = all_parameters(model)
    assert [n for n in before if not torch.equal(before[n], after[n])] == [f"{name}.weight"]


def test_unconstrained_file_moves_past_the_ft_l_bound(tiny_llama, tiny_tok, shipped, one_token):
    bound = shipped("smollm2-135m.json").norm_constraint
    hp = shipped("smollm2-135m_unconstr.json")
    assert hp.norm_constraint is False and not hp.constrained
    name = hp.rewrite_module_tmp.format(1)
    w0 = weight_parameter(tiny_llama, name).detach().clone()
    apply_ft_to_model(tiny_llama, tiny_tok, one_token, hp)
    assert float((weight_parameter(tiny_llama, name).detach() - w0).abs().max()) > 1.2 * bound


def test_loss_scores_every_target_token_after_the_prompt(tiny_llama, tiny_tok):
    """Not teacher forcing: each token of a multi-token target is read at the prompt's last position;
    the loss is the mean over a request's tokens, then over requests; left padding changes nothing."""
    prompts, targets = ["The Eiffel Tower is in", "A"], ["New York City", "piano"]
    expected = []
    for prompt, target in zip(prompts, targets):
        ids = torch.tensor([tiny_tok(prompt)["input_ids"]])
        log_probs = torch.log_softmax(tiny_llama(input_ids=ids).logits[0, -1], dim=-1)
        wanted = tiny_tok(" " + target, add_special_tokens=False)["input_ids"]
        expected.append(-log_probs[wanted].mean())
    assert len(tiny_tok(" New York City", add_special_tokens=False)["input_ids"]) > 1
    with torch.no_grad():
        batched = ft_loss(tiny_llama, tiny_tok, prompts, targets, "cpu")
    assert float(batched) == pytest.approx(float(torch.stack(expected).mean()), rel=1e-5)


def test_a_loss_below_stop_loss_takes_no_step(tiny_llama, tiny_tok, shipped, one_token):
    hp = shipped("smollm2-135m.json", stop_loss=1e9)
    name = hp.rewrite_module_tmp.format(1)
    w0 = weight_parameter(tiny_llama, name).detach().clone()
    report = apply_ft_to_model(tiny_llama, tiny_tok, one_token, hp)
    assert torch.equal(weight_parameter(tiny_llama, name).detach(), w0)
    assert report.extra["ft_steps"] == 1


def test_ft_stops_after_the_first_epoch_below_stop_loss(tiny_llama, tiny_tok, shipped, one_token):
    """The tiny models' final norm caps their logits (no target reaches the default 1e-2), so the
    stopping level is set 0.3 below the starting loss, which a large step reaches well within 200 epochs."""
    start = float(target_nll(tiny_llama, tiny_tok, one_token[:1])[0])
    hp = shipped("smollm2-135m_unconstr.json", lr=5e-2, num_steps=200, stop_loss=start - 0.3)
    report = apply_ft_to_model(tiny_llama, tiny_tok, one_token[:1], hp)
    assert report.extra["ft_loss"] < hp.stop_loss
    assert 1 < report.extra["ft_steps"] < 200


@pytest.mark.parametrize("value, message", [(True, "not true"), (-1e-3, ">= 0")])
def test_bad_norm_constraint_is_rejected(value, message, shipped):
    with pytest.raises(HParamsError, match=message):
        shipped("smollm2-135m.json", norm_constraint=value)
