"""Shared fixtures: tiny random GPT-2 (Conv1D) and Llama (Linear) models with a small real BPE tokenizer,
the real data folder, and the embedded model for integration tests."""
from __future__ import annotations

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


@pytest.fixture(scope="session")
def embedded_model_and_tok():
    """The real embedded model (SmolLM2-135M-Instruct), loaded once per test session on the CPU."""
    from util.models import load_model_and_tokenizer

    return load_model_and_tokenizer("smollm2-135m", device="cpu", dtype="float32")
