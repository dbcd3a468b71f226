"""Shared fixtures: tiny random GPT-2 (Conv1D) and Llama (Linear) models with a small real BPE tokenizer,
the real data folder, the editing inputs the tiny-model tests share (requests, context templates, MEMIT-style
hparams, a statistics folder), and the embedded model for integration tests.

Tests that load the embedded model (SmolLM2-135M) are marked ``slow``: through the ``embedded_model_and_tok``
fixture automatically, by hand where a test runs the driver on it. ``python -m pytest tests -q`` runs
everything; ``-m "not slow"`` is the quick loop while editing."""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))


def shared_data_dir() -> Path:
    """Real data: ``ECE_TEST_DATA_DIR`` or ``../shared/data`` next to the checkout."""
    candidates = [os.environ.get("ECE_TEST_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "counterfact.json").exists():
            return Path(candidate)
    raise FileNotFoundError(
        "real data not found: set ECE_TEST_DATA_DIR or place the shared data folder at "
        f"{REPO_ROOT.parent / 'shared' / 'data'}"
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return shared_data_dir()


def _train_tokenizer(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = (shared_data_dir() / "wikitext" / "wiki.valid.raw").read_text().splitlines()[:3000]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(text, trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )
    return tok


@pytest.fixture(scope="session")
def tiny_tok():
    """A real byte-level BPE tokenizer (1000 tokens, trained on WikiText) that adds no BOS."""
    return _train_tokenizer(add_bos=False)


@pytest.fixture(scope="session")
def tiny_tok_bos():
    """The same tokenizer, adding a BOS token in front of every text."""
    return _train_tokenizer(add_bos=True)


def make_tiny_gpt2(vocab_size: int = 1000, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=32, n_layer=4, n_head=4)
    return GPT2LMHeadModel(config).eval().requires_grad_(False)


def make_tiny_llama(vocab_size: int = 1000, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


def pytest_collection_modifyitems(items):
    """Every test that takes the embedded model is ``slow`` (registered in pytest.ini)."""
    for item in items:
        if "embedded_model_and_tok" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# -- Editing inputs shared by the tiny-model tests --------------------------------------------------

# Module names of the tiny models' edited MLPs, per architecture.
TINY_MODULES = {
    "gpt2": dict(rewrite_module_tmp="transformer.h.{}.mlp.c_proj", layer_module_tmp="transformer.h.{}",
                 ln_f_module="transformer.ln_f", mlp_module_tmp="transformer.h.{}.mlp"),
    "llama": dict(rewrite_module_tmp="model.layers.{}.mlp.down_proj", layer_module_tmp="model.layers.{}",
                  ln_f_module="model.norm", mlp_module_tmp="model.layers.{}.mlp"),
}
TINY_REQUESTS = [
    {"case_id": 0, "prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
     "target_new": {"str": "English"}, "target_true": {"str": "French"}},
    {"case_id": 1, "prompt": "{} is located in the city of", "subject": "The Eiffel Tower",
     "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
    {"case_id": 2, "prompt": "{}, who plays the", "subject": "Miles Davis",
     "target_new": {"str": "piano"}, "target_true": {"str": "trumpet"}},
]
TINY_TEMPLATES = [["{}"], ["The history of the city. {}", "In the beginning. {}"]]


def tiny_hparams(arch: str, cls=None, **overrides):
    """MEMIT-style hparams (or ``cls``'s, built on them) for a tiny model: layers 1 and 2 of 4, 15 target steps."""
    if cls is None:
        from baselines.memit import MEMITHyperParams as cls
    values = dict(layers=[1, 2], fact_token="subject_last", v_num_grad_steps=15, v_lr=0.5, v_loss_layer=3,
                  v_weight_decay=0.01, clamp_norm_factor=4.0, kl_factor=0.0625, mom2_adjustment=True,
                  mom2_dataset="wikitext", mom2_n_samples=40, mom2_sample_length=32, mom2_dtype="float32",
                  mom2_update_weight=1.0, **TINY_MODULES[arch])
    values.update(overrides)
    return cls.from_dict(values)


@pytest.fixture
def arch_modules() -> dict:
    """``{"gpt2": {...}, "llama": {...}}``: the tiny models' module name templates."""
    return copy.deepcopy(TINY_MODULES)


@pytest.fixture
def edit_requests() -> list:
    """Three counterfactual requests (case ids 0, 1, 2), a fresh copy per test."""
    return copy.deepcopy(TINY_REQUESTS)


@pytest.fixture
def context_templates() -> list:
    """Fixed context templates: the bare prompt and two short prefixes."""
    return copy.deepcopy(TINY_TEMPLATES)


@pytest.fixture
def make_hparams():
    """``make_hparams(arch, cls=MEMITHyperParams, **overrides)``: see ``tiny_hparams``."""
    return tiny_hparams


@pytest.fixture
def fixed_context(context_templates):
    """``fixed_context(templates=None, seed=0)``: an EditContext whose templates are fixed (default: the
    ``context_templates`` fixture's) instead of generated."""
    from editing.context import EditContext

    def make(templates=None, seed: int = 0):
        context = EditContext("tiny", seed=seed)
        chosen = context_templates if templates is None else templates
        context.context_templates = lambda *a, **k: chosen
        return context

    return make


@pytest.fixture
def stats_dir(tmp_path, monkeypatch, data_dir):
    """A fresh statistics folder (``ECE_STATS_DIR``), with ``ECE_DATA_DIR`` at the real data."""
    monkeypatch.setenv("ECE_STATS_DIR", str(tmp_path / "stats"))
    monkeypatch.setenv("ECE_DATA_DIR", str(data_dir))
    return tmp_path / "stats"


@pytest.fixture(scope="session")
def embedded_model_and_tok():
    """The real embedded model (SmolLM2-135M-Instruct), loaded once per test session on the CPU."""
    from util.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m", device="cpu", dtype="float32")
