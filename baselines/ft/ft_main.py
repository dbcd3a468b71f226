"""FT and FT-L: fine-tuning one MLP output matrix on the new targets (Zhu et al., 2020; the ROME/MEMIT baseline).

The objective, steps and bound follow the reference implementation (kmeng01/memit
``baselines/ft/ft_main.py``, the same in AlphaEdit and ECE), so the published FT/FT-L rows can be compared:

- loss (ref. lines 116-127): the prompt is run once and *every* token of ``target_new`` is scored at the
  position after the prompt (no teacher forcing); each request's loss is the mean over its target tokens,
  the batch loss the mean over requests;
- Adam with coupled ``weight_decay`` (lines 93-97); a batch whose loss is already below ``stop_loss``
  takes no step (lines 131-133), and training stops after an epoch whose mean loss is below it (145);
- FT-L: after every batch each weight is clamped to ``W_0 +- norm_constraint`` (an L-infinity bound on
  the change, lines 135-141); ``norm_constraint: false`` is plain FT, as in the ``*_unconstr.json`` files.

Differences kept: the reference selects parameters by substring, which on GPT-2 also trains ``c_proj.bias``;
here only the weight is trained, because the driver snapshots and restores weights only. Its target padding
and Llama-3's BOS token also enter its loss (a tokenisation artefact); here only the target's own tokens do.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar, List, Optional, Tuple, Union

import torch

from editing.round import EditReport, timed
from util.hparams import HyperParams, require
from util.models import model_device
from util.scoring import left_padded_logits
from util.tokens import chunks, prompt_ids, target_ids
from util.weights import weight_parameter

LOG = logging.getLogger(__name__)


@dataclass
class FTHyperParams(HyperParams):
    layers: List[int]
    rewrite_module_tmp: str
    num_steps: int
    lr: float
    weight_decay: float
    # Largest allowed |W - W_0| per entry (FT-L); false or null: unconstrained FT.
    norm_constraint: Union[float, bool, None]
    batch_size: int = 64
    stop_loss: float = 1e-2
    # Accepted for compatibility with the original files and ignored with a warning (the reference does not
    # read them either).
    layer_module_tmp: Optional[str] = None
    mlp_module_tmp: Optional[str] = None
    attn_module_tmp: Optional[str] = None
    ln_f_module: Optional[str] = None
    lm_head_module: Optional[str] = None
    kl_factor: Optional[float] = None

    COMPATIBILITY_KEYS: ClassVar[Tuple[str, ...]] = ("layer_module_tmp", "mlp_module_tmp", "attn_module_tmp",
                                                     "ln_f_module", "lm_head_module", "kl_factor")

    @property
    def constrained(self) -> bool:
        return self.norm_constraint is not None and self.norm_constraint is not False

    def validate(self, source: str) -> None:
        require(len(self.layers) > 0, source, "layers", "must list at least one layer")
        require("{}" in self.rewrite_module_tmp, source, "rewrite_module_tmp", "must contain '{}'")
        require(self.num_steps >= 1, source, "num_steps", "must be >= 1")
        require(self.batch_size >= 1, source, "batch_size", "must be >= 1")
        require(self.norm_constraint is not True, source, "norm_constraint",
                "must be a number (the bound) or false (unconstrained FT), not true")
        require(not self.constrained or self.norm_constraint >= 0, source, "norm_constraint", "must be >= 0")


def ft_loss(model, tok, prompts: List[str], targets: List[str], device) -> torch.Tensor:
    """Mean over requests of the mean NLL of each target token, all read after the prompt's last token."""
    rows = [prompt_ids(tok, p) for p in prompts]
    wanted = [target_ids(tok, t) for t in targets]
    log_probs = torch.log_softmax(left_padded_logits(model, tok, rows, 1, device)[:, -1].float(), dim=-1)
    per_request = [-log_probs[i, torch.tensor(w, device=log_probs.device)].mean() for i, w in enumerate(wanted)]
    return torch.stack(per_request).mean()


def apply_ft_to_model(model, tok, requests, hparams: FTHyperParams, context=None, state=None) -> EditReport:
    """Fine-tune the rewrite modules of ``hparams.layers`` in place on all requests of the round."""
    report = EditReport()
    names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    params = [weight_parameter(model, name) for name in names]
    originals = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    pairs = [(r["prompt"].format(r["subject"]), r["target_new"]["str"]) for r in requests]
    device = model_device(model)
    epochs, mean_loss = 0, float("nan")
    try:
        with timed(report.seconds, "update"):
            for _ in range(hparams.num_steps):
                total = 0.0
                for batch in chunks(pairs, hparams.batch_size):
                    loss = ft_loss(model, tok, [p for p, _ in batch], [t for _, t in batch], device)
                    value = loss.item()
                    if value >= hparams.stop_loss:
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                    if hparams.constrained:
                        with torch.no_grad():
                            for p, p0 in zip(params, originals):
                                p.copy_(torch.clamp(p, p0 - hparams.norm_constraint, p0 + hparams.norm_constraint))
                    total += value * len(batch)
                epochs += 1
                mean_loss = total / len(pairs)
                LOG.debug("FT epoch %d: mean loss %.4f", epochs, mean_loss)
                if mean_loss < hparams.stop_loss:
                    break
    finally:
        for p in params:
            p.requires_grad_(False)
    with torch.no_grad():
        largest = max(float((p - p0).abs().max()) for p, p0 in zip(params, originals))
    LOG.info("FT: %d epochs, last mean loss %.4f, largest |W - W0| %.2e", epochs, mean_loss, largest)
    report.extra.update(ft_steps=epochs, ft_loss=mean_loss, ft_max_abs_change=largest)
    return report
