"""Context prefixes run once and shared: which rows share them, and that sharing changes no value."""
import pytest
import torch

from editing.keys import compute_keys, request_templates, states_at_fact_tokens
from editing.prefixes import after_prefixes, context_texts, shared_prefixes
from editing.target_values import compute_target_values
from util.hooks import get_module
from util.tokens import prompt_ids

MODULES = {"gpt2": ("transformer.h.{}.mlp.c_proj", "transformer.h.{}"),
           "llama": ("model.layers.{}.mlp.down_proj", "model.layers.{}")}
# The third context is the second one continued; the last one glues the subject to its text, so that a row
# written in it may be tokenised across the joint and then shares nothing.
CONTEXTS = ["{}", "The history of the city. {}", "The history of the city. In the beginning. {}", "In t{}"]


def test_context_texts_are_the_distinct_texts_before_the_prompt():
    assert context_texts(CONTEXTS + ["The history of the city. {}"]) == [
        "The history of the city.", "The history of the city. In the beginning.", "In t"]


@pytest.mark.parametrize("bos", [False, True])
def test_rows_share_the_longest_context_they_begin_with(tiny_llama, request, bos):
    tok = request.getfixturevalue("tiny_tok_bos" if bos else "tiny_tok")
    shared = shared_prefixes(tiny_llama, tok, context_texts(CONTEXTS), torch.device("cpu"))
    rows = [prompt_ids(tok, t.format("Danielle Darrieux") + " speaks") for t in CONTEXTS[:3]]
    rows.append(prompt_ids(tok, "In the city speaks"))  # "In t" + "he city": "t" and "he" merge
    rows.append(prompt_ids(tok, "In tory speaks"))
    cut = after_prefixes(tok, rows, shared, torch.device("cpu"))
    lengths = [len(prompt_ids(tok, text)) for text in context_texts(CONTEXTS)]
    assert rows[3][: lengths[2]] != prompt_ids(tok, "In t")  # the tokeniser did merge across the joint
    assert cut.covered == [0, lengths[0], lengths[1], 0, lengths[2]]
    for row, covered, own, mask in zip(rows, cut.covered, cut.input_ids.tolist(), cut.own_mask.tolist()):
        assert own[: sum(mask)] == row[covered:]
    # A limit keeps a prefix from covering the fact token: then the shorter context is the longest that fits.
    limited = after_prefixes(tok, rows[2:3], shared, torch.device("cpu"), within=[lengths[1] - 1])
    assert limited.covered == [lengths[0]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("bos", [False, True])
def test_states_with_shared_contexts_equal_whole_rows(arch, bos, request, edit_requests):
    """Keys and outputs at the fact token are the same whether the contexts run once or in every row,
    including rows whose context is tokenised differently and subjects at the prompt's start."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok_bos" if bos else "tiny_tok")
    rewrite, layer = (name.format(i) for name, i in zip(MODULES[arch], (1, 2)))
    templates, subjects = request_templates(edit_requests, [CONTEXTS])
    whole = states_at_fact_tokens(model, tok, templates, subjects, "subject_last", inputs_of=[rewrite],
                                  outputs_of=[layer], batch_size=5)
    shared = states_at_fact_tokens(model, tok, templates, subjects, "subject_last", inputs_of=[rewrite],
                                   outputs_of=[layer], batch_size=5, contexts=context_texts(CONTEXTS))
    for a, b in zip(whole, shared):
        for name in a:
            assert torch.allclose(a[name], b[name], atol=1e-5), name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_contexts_shorten_the_passes(arch, request, edit_requests, make_hparams):
    """compute_keys and the target loops' prefix pass run fewer tokens through the first layer, with the
    values of the whole rows (compute_target_values with prefix_cache=False runs every token every step)."""
    model = request.getfixturevalue(f"tiny_{arch}")
    tok = request.getfixturevalue("tiny_tok")
    hp = make_hparams(arch, v_num_grad_steps=3, v_stop_loss=0.0)
    first_layer = get_module(model, MODULES[arch][1].format(0))
    tokens = []
    counter = first_layer.register_forward_hook(lambda module, args, out: tokens.append(int(args[0].shape[:2].numel())))
    try:
        templates, subjects = request_templates(edit_requests, [CONTEXTS])
        states_at_fact_tokens(model, tok, templates, subjects, "subject_last", inputs_of=[MODULES[arch][0].format(1)])
        whole_tokens, tokens[:] = sum(tokens), []
        keys = compute_keys(model, tok, edit_requests, hp, [1, 2], [CONTEXTS])
        assert sum(tokens) < 0.8 * whole_tokens
        tokens[:] = []
        cached = compute_target_values(model, tok, edit_requests, hp, [CONTEXTS], z_layer=2, requests_per_loop=1)
        cached_tokens, tokens[:] = sum(tokens), []
        full = compute_target_values(model, tok, edit_requests, hp, [CONTEXTS], z_layer=2, prefix_cache=False)
        assert cached_tokens < sum(tokens) / 2
    finally:
        counter.remove()
    assert set(keys) == {1, 2}
    assert torch.allclose(cached.targets, full.targets, rtol=1e-4, atol=1e-5)
    assert cached.losses == pytest.approx(full.losses, rel=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layer_loop_runs_the_unchanged_lower_blocks_once(arch, request, tiny_tok, edit_requests, make_hparams):
    """MEMIT's layer loop edits its layers bottom up, so at each layer the blocks below the layer edited last
    are as they were: with ``z_below_cache`` they are skipped and their kept output replayed. The deltas are
    the same bit for bit, and the lowest block runs the rows in the first layer's pass only."""
    from editing.update import least_squares_delta, spread_update_over_layers
    from util.weights import read_weight

    model = request.getfixturevalue(f"tiny_{arch}")
    original = {name: p.detach().clone() for name, p in model.named_parameters()}
    deltas, runs = {}, {}
    for below_cache in (False, True):
        model.load_state_dict(original, strict=False)
        hp = make_hparams(arch, layers=[1, 2], z_below_cache=below_cache)
        second = {layer: torch.eye(read_weight(model, hp.rewrite_module(layer)).shape[1]) for layer in hp.layers}
        solve = lambda layer, k, r: least_squares_delta(k, r, second[layer], 0.5)
        targets = torch.randn(len(edit_requests), model.config.hidden_size, generator=torch.Generator().manual_seed(0))
        calls = []
        # a module inside block 0 (a skipped block's own hooks still fire; its contents do not run)
        handle = get_module(model, hp.rewrite_module(0)).register_forward_hook(lambda *_: calls.append(1))
        try:
            record = spread_update_over_layers(model, tiny_tok, edit_requests, hp, targets, [CONTEXTS], solve)
        finally:
            handle.remove()
        deltas[below_cache], runs[below_cache] = record.deltas, len(calls)
    for layer in (1, 2):
        assert torch.equal(deltas[True][layer], deltas[False][layer])
        assert deltas[True][layer].abs().max() > 0
    # Each pass runs block 0 over the shared contexts (their keys and values serve the blocks above) and over
    # the one batch of rows; the second pass now skips the rows.
    assert (runs[False], runs[True]) == (4, 3)
