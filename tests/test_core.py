"""Hooks, weight orientation, hparams validation, fact-token positions, model-loading errors."""
import json

import pytest
import torch

from editing.keys import fact_token_index, states_at_fact_tokens
from util.hooks import Trace, TraceDict, low_precision_products
from util.hparams import HParamsError
from util.models import ModelNotFoundError, load_model_and_tokenizer, parse_dtype
from util.paths import REPO_ROOT
from util.tokens import leading_special_ids, pad_batch
from util.weights import add_to_weight, read_weight, snapshot_weights, temporarily_loaded

GPT2_DOWN = "transformer.h.{}.mlp.c_proj"
LLAMA_DOWN = "model.layers.{}.mlp.down_proj"


@pytest.mark.parametrize("fixture,down,block", [("tiny_gpt2", GPT2_DOWN, "transformer.h.{}"),
                                                ("tiny_llama", LLAMA_DOWN, "model.layers.{}")])
def test_trace_records_and_edits(request, tiny_tok, fixture, down, block):
    model = request.getfixturevalue(fixture)
    ids = torch.tensor([tiny_tok("The tower is in Paris")["input_ids"]])
    with Trace(model, down.format(1), retain_input=True) as t:
        base = model(input_ids=ids).logits
    weight, bias = read_weight(model, down.format(1)), getattr(model.get_submodule(down.format(1)), "bias", None)
    expected = t.input @ weight.T + (bias if bias is not None else 0.0)
    assert torch.allclose(t.output, expected, atol=1e-5)
    # Editing a decoder layer's output (a tensor in transformers 5) changes the logits.
    with Trace(model, block.format(2), edit_output=lambda h: h + 1.0):
        edited = model(input_ids=ids).logits
    assert not torch.allclose(base, edited)
    # Stopping after a layer ends the forward pass without an error, with the output recorded.
    with TraceDict(model, [block.format(0), block.format(1)], stop=True) as traces:
        model(input_ids=ids)
    assert traces[block.format(1)].output.shape[:2] == ids.shape


@pytest.mark.parametrize("fixture,down", [("tiny_gpt2", GPT2_DOWN), ("tiny_llama", LLAMA_DOWN)])
def test_weight_orientation_is_handled_in_one_place(request, fixture, down):
    model = request.getfixturevalue(fixture)
    name = down.format(0)
    module = model.get_submodule(name)
    w = read_weight(model, name)
    d_out, d_in = w.shape
    assert d_out == model.config.hidden_size and d_in > d_out  # [d_model, d_ff] whatever the storage
    x = torch.randn(3, d_in)
    delta = torch.randn(d_out, d_in) * 0.01
    before = module(x)
    original = snapshot_weights(model, [name])
    add_to_weight(model, name, delta)
    assert torch.allclose(module(x) - before, x @ delta.T, atol=1e-5)
    with temporarily_loaded(model, original):
        assert torch.allclose(module(x), before, atol=1e-6)
    assert torch.allclose(module(x) - before, x @ delta.T, atol=1e-5)
    with pytest.raises(ValueError, match="does not fit"):
        add_to_weight(model, name, delta.T)


@pytest.mark.parametrize("fixture,block", [("tiny_gpt2", "transformer.h.{}"), ("tiny_llama", "model.layers.{}")])
def test_low_precision_products_round_only_the_products(request, tiny_tok, fixture, block):
    """Inside low_precision_products the blocks' products run in bfloat16 (outputs move by bfloat16
    rounding, not more), the hidden states stay float32, and afterwards the model computes exactly as
    before with its weights untouched."""
    model = request.getfixturevalue(fixture)
    ids = torch.tensor([tiny_tok("The tower is in Paris")["input_ids"]])
    names = [block.format(i) for i in (2, 3)]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with Trace(model, names[-1]) as exact:
        model(input_ids=ids)
    with low_precision_products(model, names, torch.bfloat16), Trace(model, names[-1]) as low:
        model(input_ids=ids)
    assert low.output.dtype == torch.float32
    difference = (low.output - exact.output).norm() / exact.output.norm()
    assert 1e-5 < difference < 3e-2  # bfloat16 has 8 bits of mantissa: rounded, not broken
    with Trace(model, block.format(1)) as below_exact, Trace(model, names[-1]) as again:
        model(input_ids=ids)
    assert torch.equal(again.output, exact.output)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all("forward" not in m.__dict__ for m in model.modules())
    with low_precision_products(model, names, torch.bfloat16), Trace(model, block.format(1)) as below_low:
        model(input_ids=ids)
    assert torch.equal(below_low.output, below_exact.output)  # layers not named keep their precision


@pytest.mark.parametrize("tok_fixture", ["tiny_tok", "tiny_tok_bos"])
def test_fact_token_index_with_and_without_bos(request, tok_fixture):
    tok = request.getfixturevalue(tok_fixture)
    template, subject = "The mother tongue of {} is", "Danielle Darrieux"
    ids = tok(template.format(subject))["input_ids"]
    last = fact_token_index(tok, template, subject, "subject_last")
    first = fact_token_index(tok, template, subject, "subject_first")
    assert tok.decode(ids[first : last + 1]).strip() == subject
    assert fact_token_index(tok, template, subject, "last") == len(ids) - 1
    # Subject at the very start of the prompt.
    ids = tok("Paris is the capital")["input_ids"]
    assert tok.decode(ids[: fact_token_index(tok, "{} is the capital", "Paris") + 1]).replace("<bos>", "") == "Paris"
    assert len(leading_special_ids(tok)) == (1 if tok_fixture == "tiny_tok_bos" else 0)
    with pytest.raises(ValueError, match="exactly once"):
        fact_token_index(tok, "no placeholder", "Paris")


def test_states_at_fact_tokens_do_not_depend_on_batching(tiny_llama, tiny_tok_bos):
    templates = ["{} is in", "The famous tower called {} stands in the city of"]
    subjects = ["Eiffel Tower", "Big Ben"]
    name = LLAMA_DOWN.format(2)
    together, _ = states_at_fact_tokens(tiny_llama, tiny_tok_bos, templates, subjects, "subject_last", inputs_of=[name])
    for i in range(2):
        alone, _ = states_at_fact_tokens(tiny_llama, tiny_tok_bos, templates[i:i + 1], subjects[i:i + 1],
                                         "subject_last", inputs_of=[name])
        assert torch.allclose(together[name][i], alone[name][0], atol=1e-5)


@pytest.mark.parametrize("fact_token", ["subject_last", "subject_first"])
def test_states_at_fact_tokens_equal_a_forward_over_the_whole_prompt(tiny_gpt2, tiny_tok_bos, fact_token):
    """The rows stop at the fact token; in a causal model the later tokens change nothing there."""
    from util.hooks import TraceDict

    templates = ["{} is in the city of", "The famous tower called {} stands in the city of"]
    subjects = ["Eiffel Tower", "Big Ben"]
    mlp, block = "transformer.h.2.mlp.c_proj", "transformer.h.3"
    inputs, outputs = states_at_fact_tokens(tiny_gpt2, tiny_tok_bos, templates, subjects, fact_token,
                                            inputs_of=[mlp], outputs_of=[block])
    for i, (template, subject) in enumerate(zip(templates, subjects)):
        ids = torch.tensor([tiny_tok_bos(template.format(subject))["input_ids"]])
        position = fact_token_index(tiny_tok_bos, template, subject, fact_token)
        assert position < ids.shape[1] - 1  # tokens follow the fact token
        with TraceDict(tiny_gpt2, [mlp, block], retain_input=True) as traces:
            tiny_gpt2(input_ids=ids)
        assert torch.allclose(inputs[mlp][i], traces[mlp].input[0, position], atol=1e-5)
        block_output = traces[block].output
        block_output = block_output[0] if isinstance(block_output, tuple) else block_output
        assert torch.allclose(outputs[block][i], block_output[0, position], atol=1e-5)


def test_pad_batch_sides(tiny_tok):
    ids, mask = pad_batch(tiny_tok, [[5, 6, 7], [8]], side="left")
    assert ids[1].tolist()[-1] == 8 and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch(tiny_tok, [[5, 6, 7], [8]], side="right")
    assert ids[1].tolist()[0] == 8 and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_hparams_errors_name_file_and_key(tmp_path):
    from baselines.memit import MEMITHyperParams

    good = json.loads((REPO_ROOT / "hparams" / "MEMIT" / "smollm2-135m.json").read_text())
    MEMITHyperParams.from_dict(good)
    cases = [
        ({**good, "layerz": [1]}, "unknown key.*layerz"),
        ({k: v for k, v in good.items() if k != "layers"}, "missing required key.*layers"),
        ({**good, "v_lr": "fast"}, "'v_lr' must be float"),
        ({**good, "layers": [7, 3]}, "'layers' must be increasing"),
        ({**good, "v_loss_layer": 2}, "'v_loss_layer' must be >="),
        ({**good, "rewrite_module_tmp": "model.mlp"}, "'rewrite_module_tmp' must contain"),
    ]
    for values, pattern in cases:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(values))
        with pytest.raises(HParamsError, match=pattern) as info:
            MEMITHyperParams.from_json(path)
        assert str(path) in str(info.value)
    path.write_text("{ not json")
    with pytest.raises(HParamsError, match="not valid JSON.*line 1"):
        MEMITHyperParams.from_json(path)


def test_unknown_model_error_lists_embedded_models():
    with pytest.raises(ModelNotFoundError, match="smollm2-135m") as info:
        load_model_and_tokenizer("./no/such/model/dir", device="cpu")
    assert "hub id" in str(info.value)
    assert parse_dtype("auto", "cpu") == torch.float32
    with pytest.raises(ValueError, match="unknown dtype"):
        parse_dtype("float8", "cpu")


def test_trace_dict_stops_after_the_module_that_finishes_last(tiny_gpt2, tiny_tok):
    ids = torch.tensor([tiny_tok("The tower is in Paris")["input_ids"]])
    # The block contains the projection, so the block finishes last although it is listed first.
    names = ["transformer.h.2", "transformer.h.2.mlp.c_proj"]
    with TraceDict(tiny_gpt2, names, retain_input=True) as full:
        tiny_gpt2(input_ids=ids)
    with TraceDict(tiny_gpt2, names, retain_input=True, stop=True) as traces:
        tiny_gpt2(input_ids=ids)
    # Both modules ran to the end: what they recorded is what a full forward pass records.
    assert torch.equal(traces[names[0]].output, full[names[0]].output)
    assert torch.equal(traces[names[1]].input, full[names[1]].input)
    assert torch.equal(traces[names[1]].output, full[names[1]].output)


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_continuation_scores_match_one_unpadded_forward_per_pair(request, tiny_tok_bos, fixture):
    """Batched, left-padded scoring with logits only at the last positions, one-token targets after the
    same prefix sharing a row, equals scoring each pair alone over the full logits (GPT-2's absolute
    positions included)."""
    from util.scoring import continuation_scores
    from util.tokens import prompt_ids, target_ids

    model = request.getfixturevalue(fixture)
    shared = "The Eiffel Tower is in"
    prefixes = [shared, "Paris", "A much longer prompt about the history of the city of", shared, shared]
    targets = ["city", "the capital of France", "Berlin", "the", "the capital of France"]
    assert [len(target_ids(tiny_tok_bos, t)) for t in targets] == [1, 8, 4, 1, 8]
    rows = []
    handle = model.register_forward_hook(lambda module, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]),
                                         with_kwargs=True)
    try:
        batched = continuation_scores(model, tiny_tok_bos, prefixes, targets, batch_size=2)
    finally:
        handle.remove()
    # The two one-token targets after the shared prefix are read from one row.
    assert sum(rows) == 4
    for prefix, target, score in zip(prefixes, targets, batched):
        p, t = prompt_ids(tiny_tok_bos, prefix), target_ids(tiny_tok_bos, target)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0]
        log_probs = torch.log_softmax(logits[len(p) - 1 : len(p) - 1 + len(t)], dim=-1)
        expected = -log_probs.gather(1, torch.tensor(t)[:, None])[:, 0]
        assert score.token_nlls == pytest.approx(expected.tolist(), rel=1e-4, abs=1e-5)
        assert score.token_correct == (log_probs.argmax(-1) == torch.tensor(t)).tolist()


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_output_head_gets_a_contiguous_input_and_the_same_logits(request, fixture):
    """transformers hands the head a strided view of the last positions (``logits_to_keep``); the pre-hook
    makes it contiguous (torch's CPU product on the view is 5-10x slower) without changing the logits."""
    import copy

    from util.models import make_output_head_input_contiguous

    plain = request.getfixturevalue(fixture)
    model = copy.deepcopy(plain)
    make_output_head_input_contiguous(model)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: seen.append(args[0].is_contiguous()))
    ids = torch.randint(0, 1000, (3, 7))
    with torch.no_grad():
        expected = plain(input_ids=ids, logits_to_keep=2).logits
        logits = model(input_ids=ids, logits_to_keep=2).logits
    assert seen == [True]
    assert torch.allclose(logits, expected, atol=1e-6) and logits.shape == (3, 2, 1000)
