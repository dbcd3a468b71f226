"""The one place that knows how a rewrite module stores its weight.

The mathematics treats every rewrite module as ``W : d_in -> d_out`` with ``W`` of shape
``[d_out, d_in]`` (torch Linear convention). GPT-2's ``Conv1D`` stores ``[d_in, d_out]``; the helpers
below hide that, so method code never transposes by hand.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterable

import torch

from util.hooks import get_module


def _stores_transposed(module: torch.nn.Module) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always present in this project
        return False
    return isinstance(module, Conv1D)


def product_modules(module: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The matrix-product layers inside ``module`` (``nn.Linear`` and GPT-2's ``Conv1D``), by relative name."""
    return {name: child for name, child in module.named_modules()
            if isinstance(child, torch.nn.Linear) or _stores_transposed(child)}


def as_linear(module: torch.nn.Module):
    """``(weight [d_out, d_in], bias or None)`` of a product layer, so that ``F.linear(x, weight, bias)``
    computes its forward."""
    weight = module.weight.T if _stores_transposed(module) else module.weight
    return weight, module.bias


def weight_parameter(model: torch.nn.Module, module_name: str) -> torch.nn.Parameter:
    module = get_module(model, module_name)
    if not hasattr(module, "weight"):
        raise KeyError(f"module '{module_name}' ({type(module).__name__}) has no weight to edit")
    return module.weight


def read_weight(model: torch.nn.Module, module_name: str) -> torch.Tensor:
    """The weight as ``[d_out, d_in]`` (a view for Linear, a transposed view for Conv1D)."""
    module = get_module(model, module_name)
    return module.weight.T if _stores_transposed(module) else module.weight


def add_to_weight(model: torch.nn.Module, module_name: str, delta: torch.Tensor) -> None:
    """``W <- W + delta`` with ``delta`` given as ``[d_out, d_in]``, on the weight's device and dtype."""
    module = get_module(model, module_name)
    weight = module.weight
    stored = delta.T if _stores_transposed(module) else delta
    if stored.shape != weight.shape:
        raise ValueError(
            f"update of shape {tuple(delta.shape)} does not fit {module_name} (stored {tuple(weight.shape)}, "
            f"transposed={_stores_transposed(module)})"
        )
    with torch.no_grad():
        weight.add_(stored.to(device=weight.device, dtype=weight.dtype))


def snapshot_weights(model: torch.nn.Module, module_names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """Copies of the stored weights, on CPU, keyed by module name."""
    return {name: weight_parameter(model, name).detach().to("cpu", copy=True) for name in module_names}


def load_weights(model: torch.nn.Module, weights: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, value in weights.items():
            param = weight_parameter(model, name)
            param.copy_(value.to(device=param.device, dtype=param.dtype))


@contextmanager
def temporarily_loaded(model: torch.nn.Module, weights: Dict[str, torch.Tensor]):
    """Evaluate with other weights (e.g. the unedited ones) and put the current ones back afterwards."""
    current = snapshot_weights(model, weights)
    load_weights(model, weights)
    try:
        yield model
    finally:
        load_weights(model, current)
