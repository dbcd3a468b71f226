"""Loading a model and its tokenizer (a hub id, a local directory, or an embedded model: ``util.model_sources``)
on a device and in a dtype, and the few facts about a loaded model that the rest of the code asks for."""
from __future__ import annotations

from typing import Optional

import torch

from util.errors import SettingError
from util.model_sources import ModelNotFoundError, resolve_model_source, unknown_model_message
from util.random_models import is_random_model_name, load_random_model_and_tokenizer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(dtype: Optional[str], device: str) -> torch.dtype:
    """``auto`` (default): float32 on CPU, bfloat16 on GPUs that support it, else float16."""
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype in (None, "auto"):
        if str(device).startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in names:
        raise SettingError(f"unknown dtype '{dtype}'; use one of auto, {', '.join(sorted(names))}")
    return names[dtype]


def load_model_and_tokenizer(
    model_name: str,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    device_map: Optional[str] = None,
):
    """Return ``(model, tokenizer)`` in eval mode, gradients off, with a pad token set.

    ``random:gpt2-xl`` / ``random:llama3-8b`` (see :mod:`util.random_models`) build a published architecture
    with random weights, for speed and memory measurements only.

    ``device_map`` (e.g. ``"auto"``) shards a large model over several GPUs with accelerate; then
    ``device`` is ignored and every tensor must follow its weight's device.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    torch_dtype = parse_dtype(dtype, device)
    if is_random_model_name(model_name):  # speed and memory measurements only (util.random_models)
        if device_map:
            raise SettingError(f"'{model_name}' is built on one device; device_map is not supported for it")
        model, tok = load_random_model_and_tokenizer(model_name, device, torch_dtype)
    else:
        source = resolve_model_source(model_name)
        kwargs = {"dtype": torch_dtype}
        if device_map:
            kwargs["device_map"] = device_map
        try:
            tok = AutoTokenizer.from_pretrained(source)
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except OSError as e:
            raise ModelNotFoundError(unknown_model_message(model_name, str(e).splitlines()[0])) from e
        if not device_map:
            model.to(device)
    model.eval()
    model.requires_grad_(False)
    make_output_head_input_contiguous(model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.name_or_path = model_name
    return model, tok


def make_output_head_input_contiguous(model: torch.nn.Module) -> None:
    """Give the output head a contiguous input. For ``logits_to_keep`` transformers passes the last
    positions as a strided view; on the CPU torch multiplies such a ``[batch, k, hidden]`` view by the
    ``[vocab, hidden]`` head as a batched product with the weight expanded per row, 5-10x slower than the
    same product on a contiguous copy (SmolLM2's head: 2.4-2.7 against 12-23 GFLOP/s, 1 thread)."""
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda module, args: (args[0].contiguous(), *args[1:]))


def model_device(model: torch.nn.Module) -> torch.device:
    """Device of the input embeddings, where token ids must go."""
    return model.get_input_embeddings().weight.device


def hidden_states_only_kwargs(model) -> dict:
    """Forward arguments that skip work when only hooked hidden states are read: no KV cache, and
    logits for one position instead of the whole sequence x vocabulary (where the model supports it)."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    kwargs = {"use_cache": False} if "use_cache" in parameters else {}
    if "logits_to_keep" in parameters:
        kwargs["logits_to_keep"] = 1
    return kwargs
