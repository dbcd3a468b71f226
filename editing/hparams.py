"""Hyperparameters shared by the locate-and-edit family (ROME, MEMIT, AlphaEdit, ECE)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, List, Optional, Tuple

import torch

from util.hparams import HyperParams, require

FACT_TOKEN_CHOICES = ("subject_last", "subject_first", "last")


def _is_device(name) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True


@dataclass
class LocateEditHyperParams(HyperParams):
    # Where to edit.
    layers: List[int]
    fact_token: str
    rewrite_module_tmp: str  # MLP down-projection, e.g. "model.layers.{}.mlp.down_proj"
    layer_module_tmp: str  # decoder layer, e.g. "model.layers.{}"
    ln_f_module: str  # final norm before the unembedding, e.g. "model.norm"
    # Target values (docs/DESIGN.md section 4.4).
    v_num_grad_steps: int
    v_lr: float
    v_loss_layer: int
    v_weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    # Second-moment statistics.
    mom2_adjustment: bool
    mom2_dataset: str  # "wikitext" (local text in DATA_DIR/wikitext, else HF), "wikipedia", or a .txt path
    mom2_n_samples: int  # number of text chunks
    mom2_dtype: str
    mom2_update_weight: float = 1.0  # lambda in lambda * C0 (MEMIT); unused by ROME
    mom2_sample_length: int = 128  # tokens per text chunk
    # Stop the statistics once they hold this many keys per input dimension of the rewrite module
    # (about 10 suffices for MEMIT-family updates: "minimal precomputation"); null: mom2_n_samples chunks.
    mom2_keys_per_dimension: Optional[float] = None
    # Leave the BOS position of every text chunk out of C0 (upstream counts it; kept as an option).
    mom2_skip_bos: bool = False
    # Stopping rule of the target-value loop and the context templates ([[length, count], ...]).
    v_stop_loss: float = 5e-2
    # Also stop a request once its new target has been the most probable continuation, every target
    # token on every one of its prompts, at this many optimisation steps (ENCORE's most-probable early
    # stopping; its hparams use 2). null: v_stop_loss alone, as MEMIT publishes it.
    v_stop_most_probable_steps: Optional[int] = None
    # Also stop a request once the mean NLL of its new target over its prompts (the loss's first term alone)
    # is below this: the edit has taken. v_stop_loss counts the KL and weight-decay terms too, which rarely
    # let the total fall below 5e-2. null: off, as MEMIT publishes it.
    v_stop_nll: Optional[float] = None
    context_template_length_params: List[List[int]] = field(default_factory=lambda: [[10, 5]])
    # Speed only, same values: compute the tokens before each fact token once per target loop
    # instead of at every optimisation step (false: the published implementations' cost).
    z_prefix_cache: bool = True
    # Speed only, same values: compute the layers up to the last edited one once per target loop (no
    # step changes their output) and run only the layers above it at every step; and in the layer loop,
    # run the blocks below the layer edited last once per pass, not again for every later layer.
    z_below_cache: bool = True
    # Speed only, values equal up to float rounding: run the decoder layers of every optimisation step as
    # torch.compile'd code (inductor, dynamic shapes). On the 2-core CPU a round of 100 ECE_WI edits on
    # smollm2-135m runs 9.5% faster once compiled; the first round pays the compilation (80-160 s there).
    z_compile: bool = False
    # The precision of the target loop's matrix products in the layers above the edit and the output head
    # (null: the model's own). "bfloat16": weights cast once per loop, every product rounded to bfloat16, while
    # the residual stream, attention, norms, the delta, the losses and the unedited values keep the model's
    # dtype. "auto": bfloat16 for a float32 model where the device multiplies bfloat16 natively (a CPU with
    # AMX, amx_bf16 in lscpu, where those products run 6x faster; a GPU with bfloat16), else null. Target
    # values move by bfloat16 rounding: not a speed-only setting (edit quality measured in docs/RESULTS.md).
    z_dtype: Optional[str] = None
    # Speed only, same values: spread the target loops over these devices, e.g. ["cuda:0", "cuda:1"]; each
    # holds a full copy of the model (refreshed every round) and runs its share of the loops in a thread of
    # its own. With fewer loops than devices, each loop is split (per-request deltas only). null: the
    # model's device.
    z_devices: Optional[List[str]] = None
    # ``COMPATIBILITY_KEYS``: accepted for compatibility with MEMIT's files and ignored with a warning (the
    # output-embedding module is found from the model; every layer in ``layers`` is edited).
    # ``mlp_module_tmp``: ROME's target value sits at this module's output; the other methods do not read it.
    layer_selection: Optional[str] = None
    lm_head_module: Optional[str] = None
    mlp_module_tmp: Optional[str] = None
    attn_module_tmp: Optional[str] = None

    COMPATIBILITY_KEYS: ClassVar[Tuple[str, ...]] = ("layer_selection", "lm_head_module", "attn_module_tmp")

    def validate(self, source: str) -> None:
        require(len(self.layers) > 0, source, "layers", "must list at least one layer")
        require(self.layers == sorted(set(self.layers)), source, "layers", "must be increasing without repeats")
        require(self.fact_token in FACT_TOKEN_CHOICES, source, "fact_token", f"must be one of {FACT_TOKEN_CHOICES}")
        for key in ("rewrite_module_tmp", "layer_module_tmp"):
            require("{}" in getattr(self, key), source, key, "must contain '{}' where the layer number goes")
        require(self.v_num_grad_steps >= 1, source, "v_num_grad_steps", "must be >= 1")
        require(self.v_lr > 0, source, "v_lr", "must be > 0")
        require(self.v_loss_layer >= max(self.layers), source, "v_loss_layer", "must be >= the last edited layer")
        require(self.v_stop_most_probable_steps is None or self.v_stop_most_probable_steps >= 1, source,
                "v_stop_most_probable_steps", "must be >= 1, or null to stop on v_stop_loss alone")
        require(self.v_stop_nll is None or self.v_stop_nll > 0, source, "v_stop_nll",
                "must be > 0, or null to stop on v_stop_loss alone")
        require(self.z_devices is None or (isinstance(self.z_devices, list) and all(_is_device(d) for d in self.z_devices)),
                source, "z_devices", 'must be a list of device names such as ["cuda:0", "cuda:1"], or null')
        require(not (self.z_compile and self.z_devices and len(self.z_devices) > 1), source, "z_devices",
                "cannot be combined with z_compile yet (compiled code is not shared between threads); set one of them")
        require(self.z_dtype in (None, "auto", "float32", "bfloat16", "float16"), source, "z_dtype",
                "must be auto, float32, bfloat16 or float16, or null for the model's dtype")
        require(self.clamp_norm_factor > 0, source, "clamp_norm_factor", "must be > 0")
        require(self.mom2_n_samples >= 1, source, "mom2_n_samples", "must be >= 1")
        require(self.mom2_keys_per_dimension is None or self.mom2_keys_per_dimension > 0, source,
                "mom2_keys_per_dimension", "must be > 0, or null for mom2_n_samples chunks")
        require(self.mom2_dtype in ("float32", "float64", "float16", "bfloat16"), source, "mom2_dtype",
                "must be float32, float64, float16 or bfloat16")
        require(all(len(p) == 2 for p in self.context_template_length_params), source,
                "context_template_length_params", "must be a list of [length_in_tokens, count] pairs")

    def rewrite_module(self, layer: int) -> str:
        return self.rewrite_module_tmp.format(layer)

    def layer_module(self, layer: int) -> str:
        return self.layer_module_tmp.format(layer)
