"""Random-weight models with a published architecture, for measuring speed and memory only.

The paper's models (GPT-2 XL, Llama-3-8B) cannot be fetched on an offline machine, but the cost of an
edit depends on the shapes, not on the weights. ``random:gpt2-xl`` and ``random:llama3-8b`` build those
architectures with ``AutoModelForCausalLM.from_config`` and random weights, so that the seconds per round
and the peak memory of the editing methods can be measured at the paper's sizes. Efficacy and the other
edit-quality numbers of such a model mean nothing.

A name may shrink the architecture for tests, ``random:llama3-8b?layers=4&hidden=64&mlp=128&heads=4&kv_heads=2``;
the keys are ``layers``, ``hidden``, ``mlp``, ``heads``, ``kv_heads`` (Llama only), ``vocab``, ``positions``,
``seed`` and ``tokenizer`` (an embedded name, hub id or local folder). The tokenizer (default: the embedded
model's, SmolLM2's 49,152 tokens, read from its cached folder even without the weights) must fit in the
vocabulary; the vocabulary keeps the published size unless ``vocab`` is given, so the output
head costs what it costs in the real model (ids the tokenizer does not know are dropped when decoding).

The weights are drawn with ``seed`` on the device the model is built on: the same name gives the same
model on the same kind of device, not across devices, so statistics cached for a random model are only
valid on the device kind that computed them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, fields, replace
from typing import Optional, Tuple

import torch

from util.errors import SettingError
from util.model_sources import EMBEDDED_MODELS, resolve_model_source
from util.paths import get_paths

LOG = logging.getLogger(__name__)

RANDOM_PREFIX = "random:"


@dataclass(frozen=True)
class RandomArchitecture:
    """The shapes of a published model; ``family`` picks the transformers class."""

    family: str  # "gpt2" or "llama"
    layers: int
    hidden: int
    mlp: int
    heads: int
    vocab: int
    positions: int
    hparams_fname: str  # the shipped hparams/<ALG>/ file written for the real model
    kv_heads: Optional[int] = None  # Llama's grouped-query attention
    rope_theta: Optional[float] = None
    seed: int = 0
    tokenizer: str = "smollm2-135m"


PAPER_ARCHITECTURES = {
    # gpt2-xl's config.json: n_layer 48, n_embd 1600, n_head 25, n_inner None (4 x 1600), n_ctx 1024.
    "gpt2-xl": RandomArchitecture(family="gpt2", layers=48, hidden=1600, mlp=6400, heads=25, vocab=50257,
                                  positions=1024, hparams_fname="gpt2-xl.json"),
    # Meta-Llama-3-8B's config.json.
    "llama3-8b": RandomArchitecture(family="llama", layers=32, hidden=4096, mlp=14336, heads=32, kv_heads=8,
                                    vocab=128256, positions=8192, rope_theta=500000.0,
                                    hparams_fname="Llama3-8B.json"),
}

_INT_KEYS = ("layers", "hidden", "mlp", "heads", "kv_heads", "vocab", "positions", "seed")


def is_random_model_name(model_name: str) -> bool:
    return str(model_name).startswith(RANDOM_PREFIX)


def parse_random_model_name(model_name: str) -> Tuple[str, RandomArchitecture]:
    """``random:NAME?key=value&...`` -> (NAME, its architecture with the given changes)."""
    if not is_random_model_name(model_name):
        raise SettingError(f"'{model_name}' is not a random-model name ({RANDOM_PREFIX}NAME[?key=value&...])")
    base, _, query = model_name[len(RANDOM_PREFIX):].partition("?")
    if base not in PAPER_ARCHITECTURES:
        raise SettingError(f"unknown random architecture '{base}' in '{model_name}'; "
                           f"use one of {', '.join(sorted(PAPER_ARCHITECTURES))}")
    architecture = PAPER_ARCHITECTURES[base]
    changes = {}
    allowed = {f.name for f in fields(RandomArchitecture)} - {"family", "hparams_fname", "rope_theta"}
    for pair in filter(None, query.split("&")):
        key, sep, value = pair.partition("=")
        if not sep or key not in allowed:
            raise SettingError(f"bad random-model option '{pair}' in '{model_name}'; "
                               f"write key=value with key one of {', '.join(sorted(allowed))}")
        if key in _INT_KEYS:
            try:
                changes[key] = int(value)
            except ValueError:
                raise SettingError(f"random-model option '{key}' must be an integer, got '{value}'") from None
            if changes[key] < (0 if key == "seed" else 1):
                raise SettingError(f"random-model option '{key}' must be positive, got {value}")
        else:
            changes[key] = value
    architecture = replace(architecture, **changes)
    if architecture.hidden % architecture.heads:
        raise SettingError(f"'{model_name}': hidden {architecture.hidden} is not a multiple of heads {architecture.heads}")
    if architecture.kv_heads is not None and architecture.heads % architecture.kv_heads:
        raise SettingError(f"'{model_name}': heads {architecture.heads} is not a multiple of kv_heads "
                           f"{architecture.kv_heads}")
    return base, architecture


def random_model_hparams_fname(model_name: str) -> str:
    """The hparams file of the real model the random one copies (``gpt2-xl.json``, ``Llama3-8B.json``)."""
    return parse_random_model_name(model_name)[1].hparams_fname


def build_config(architecture: RandomArchitecture, tok=None):
    """The transformers configuration of ``architecture`` (special-token ids from ``tok`` when given)."""
    from transformers import GPT2Config, LlamaConfig

    special = {}
    if tok is not None:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        special = {"bos_token_id": start, "eos_token_id": tok.eos_token_id,
                   "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id}
    a = architecture
    if a.family == "gpt2":
        return GPT2Config(n_layer=a.layers, n_embd=a.hidden, n_inner=a.mlp, n_head=a.heads, vocab_size=a.vocab,
                          n_positions=a.positions, **special)
    if a.family == "llama":
        return LlamaConfig(num_hidden_layers=a.layers, hidden_size=a.hidden, intermediate_size=a.mlp,
                           num_attention_heads=a.heads, num_key_value_heads=a.kv_heads or a.heads,
                           head_dim=a.hidden // a.heads, vocab_size=a.vocab, max_position_embeddings=a.positions,
                           rope_theta=a.rope_theta or 10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                           **special)
    raise SettingError(f"unknown model family '{a.family}'")


def tokenizer_source(name: str) -> str:
    """Where a random model's tokenizer is read from. For an embedded model, its cached folder as soon as the
    tokenizer files are there: the weights (hundreds of MB) need not be, which is what lets a machine that
    cannot receive them still build the random models."""
    if name in EMBEDDED_MODELS:
        folder = get_paths().models_dir / name
        if (folder / "tokenizer.json").exists():
            return str(folder)
    return resolve_model_source(name)


def load_random_tokenizer(model_name: str):
    """The tokenizer of a random-model name, checked to fit in its vocabulary."""
    from transformers import AutoTokenizer

    _, architecture = parse_random_model_name(model_name)
    tok = AutoTokenizer.from_pretrained(tokenizer_source(architecture.tokenizer))
    if len(tok) > architecture.vocab:
        raise SettingError(f"'{model_name}': the tokenizer '{architecture.tokenizer}' has {len(tok)} tokens, more "
                           f"than the vocabulary of {architecture.vocab}")
    return tok


def load_random_model_and_tokenizer(model_name: str, device: str, dtype: torch.dtype):
    """``(model, tokenizer)``: the architecture of ``model_name`` with weights drawn from ``seed`` directly
    on ``device`` (drawing 8B weights on a CPU and copying them takes minutes; on a GPU, seconds)."""
    from transformers import AutoModelForCausalLM

    _, architecture = parse_random_model_name(model_name)
    tok = load_random_tokenizer(model_name)
    config = build_config(architecture, tok)
    device = torch.device(device)
    start_time = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(architecture.seed)
        with device:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    LOG.warning("built %s with RANDOM weights (%.2fB parameters, %s, %s) in %.1fs: for speed and memory only, "
                "edit quality is meaningless", model_name, sum(p.numel() for p in model.parameters()) / 1e9,
                dtype, device, time.perf_counter() - start_time)
    return model, tok


def describe(model_name: str) -> dict:
    """The architecture a random-model name stands for, as a dict (for results files)."""
    base, architecture = parse_random_model_name(model_name)
    return {"base": base, **asdict(architecture)}
