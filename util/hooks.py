"""Context-manager hooks that record or edit a module's input or output.

One small mechanism used everywhere instead of model-specific forward code (MEMIT's idea)::

    with Trace(model, "model.layers.5.mlp.down_proj", retain_input=True) as t:
        model(**inputs)
    keys = t.input

    with Trace(model, name, edit_output=lambda out: out + delta):
        model(**inputs)

    with Trace(model, name, edit_input=lambda x: x * mask):   # rewrite what the module sees
        model(**inputs)

Decoder layers of transformers 5 return a tensor, older ones a tuple whose first element is the hidden
state; both are handled. ``stop=True`` raises ``StopForward`` after the module ran, so a forward pass
can end at the last layer that is needed; ``Trace`` swallows it. ``skip_modules`` runs none of some
modules and hands on a known output instead (the layers below an edit, whose output no step changes);
``compiled_modules`` runs some modules as compiled code, their hooks still around them.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Iterable, Optional, Sequence

import torch


class StopForward(Exception):
    """Raised inside a hook to end a forward pass early; caught by the enclosing Trace."""


def get_module(model: torch.nn.Module, name: str) -> torch.nn.Module:
    modules = dict(model.named_modules())
    if name not in modules:
        close = [n for n in modules if n.split(".")[-1] == name.split(".")[-1]][:5]
        raise KeyError(
            f"model {type(model).__name__} has no module '{name}'. Similar names: {close}. "
            "Check the *_module_tmp entries of the hparams file for this architecture."
        )
    return modules[name]


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace_hidden(output, hidden):
    if isinstance(output, tuple):
        return (hidden,) + tuple(output[1:])
    return hidden


def _finishing_last(model: torch.nn.Module, names: Sequence[str]) -> str:
    """The module whose forward ends last: a parent ends after its children, so rank each module by its
    last descendant in definition order, and a parent before its child on ties."""
    order = [name for name, _ in model.named_modules()]

    def finish(name: str):
        inside = [i for i, other in enumerate(order) if other == name or other.startswith(name + ".")]
        return (max(inside), -name.count("."))

    return max(names, key=finish)


class Trace(contextlib.AbstractContextManager):
    """Hook one module: keep its input and/or output, optionally rewrite its input or output.

    ``retain_input`` keeps the input as the module received it (after ``edit_input``).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        layer: str,
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        detach: bool = True,
        stop: bool = False,
        edit_input: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
    ):
        self.input: Optional[torch.Tensor] = None
        self.output: Optional[torch.Tensor] = None
        module = get_module(model, layer)
        self._handles = []

        def pre_hook(_module, inputs):
            return (edit_input(inputs[0]),) + tuple(inputs[1:])

        if edit_input is not None:
            self._handles.append(module.register_forward_pre_hook(pre_hook))

        def hook(_module, inputs, output):
            if retain_input:
                value = inputs[0]
                self.input = value.detach() if detach else value
            hidden = _hidden(output)
            if edit_output is not None:
                hidden = edit_output(hidden)
                output = _replace_hidden(output, hidden)
            if retain_output:
                self.output = hidden.detach() if detach else hidden
            if stop:
                raise StopForward()
            return output

        self._handles.append(module.register_forward_hook(hook))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)


@contextlib.contextmanager
def _forwards_replaced(model: torch.nn.Module, names: Sequence[str], forward_of: Callable):
    """Inside the block each module of ``names`` runs ``forward_of(module)`` as its forward; afterwards the
    instance's own forward comes back (accelerate's device hooks replace it on the instance), or none."""
    named = dict(model.named_modules())  # one walk of the model: skip_modules runs at every optimisation step
    modules = [named[name] if name in named else get_module(model, name) for name in names]
    replaced = [module.__dict__.get("forward") for module in modules]
    try:
        for module in modules:
            module.forward = forward_of(module)
        yield
    finally:
        for module, forward in zip(modules, replaced):
            if forward is None:
                del module.forward
            else:
                module.forward = forward


@contextlib.contextmanager
def skip_modules(model: torch.nn.Module, names: Sequence[str], output: Callable[[], object]):
    """Inside the block, each module of ``names`` computes nothing and returns ``output()``.

    Hooks on those modules still run, so a ``Trace`` on the last skipped module sees (and may edit) the
    value handed on. ``output()`` must have the form the module returns (a tensor in transformers 5).
    """
    with _forwards_replaced(model, names, lambda module: lambda *args, **kwargs: output()):
        yield


# Compiled variants a function may gather before dynamo gives up on it: every decoder layer reads its own
# entry of the key/value cache, so one layer's code is specialised once per layer (30 for smollm2-135m).
COMPILE_RECOMPILE_LIMIT = 512


@contextlib.contextmanager
def compiled_modules(model: torch.nn.Module, names: Sequence[str]):
    """Inside the block, each module of ``names`` runs its forward as ``torch.compile``'d code (dynamic
    shapes: the batch shrinks as requests stop). Hooks live in ``Module.__call__``, outside the compiled
    code, so ``Trace`` and ``skip_modules`` work as before. Compiled code is cached on the forward's code
    object, so entering the block again (the next loop, the next round) reuses it; code that cannot be
    compiled runs eagerly with a warning.
    """
    import torch._dynamo

    limits = {"recompile_limit": max(COMPILE_RECOMPILE_LIMIT, torch._dynamo.config.recompile_limit),
              "accumulated_recompile_limit": max(8 * COMPILE_RECOMPILE_LIMIT,
                                                 torch._dynamo.config.accumulated_recompile_limit)}
    with torch._dynamo.config.patch(suppress_errors=True, **limits), \
            _forwards_replaced(model, names, lambda module: torch.compile(module.forward, dynamic=True)):
        yield


@contextlib.contextmanager
def low_precision_products(model: torch.nn.Module, names: Sequence[str], dtype: torch.dtype):
    """Inside the block, every matrix-product layer within the modules ``names`` (``nn.Linear``, GPT-2's
    ``Conv1D``) computes its product in ``dtype`` (weights cast once here, not at every call) and hands on
    its output in the input's dtype, so attention, norms and activations keep the model's precision. The
    model's weights are not touched."""
    from util.weights import as_linear, product_modules  # util.weights imports this module

    def forward_of(module):
        weight, bias = (None if t is None else t.detach().to(dtype).contiguous() for t in as_linear(module))
        return lambda x: torch.nn.functional.linear(x.to(dtype), weight, bias).to(x.dtype)

    products = [f"{name}.{child}" if child else name for name in names for child in product_modules(get_module(model, name))]
    with _forwards_replaced(model, products, forward_of):
        yield


class TraceDict(OrderedDict, contextlib.AbstractContextManager):
    """Trace several modules at once; ``stop=True`` stops after the last of ``layers`` in forward order."""

    def __init__(
        self,
        model: torch.nn.Module,
        layers: Iterable[str],
        retain_input: bool = False,
        retain_output: bool = True,
        edit_output: Optional[Callable[[torch.Tensor, str], torch.Tensor]] = None,
        detach: bool = True,
        stop: bool = False,
    ):
        super().__init__()
        layers = list(dict.fromkeys(layers))
        for name in layers:
            get_module(model, name)  # clear error for a bad name
        last = _finishing_last(model, layers) if layers else None
        for name in layers:
            self[name] = Trace(
                model,
                name,
                retain_input=retain_input,
                retain_output=retain_output,
                edit_output=(lambda out, n=name: edit_output(out, n)) if edit_output else None,
                detach=detach,
                stop=stop and name == last,
            )

    def close(self) -> None:
        for trace in self.values():
            trace.close()

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return exc_type is not None and issubclass(exc_type, StopForward)
