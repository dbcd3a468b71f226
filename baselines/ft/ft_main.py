"""FT: constrained fine-tuning of the rewrite modules on the new targets (Zhu et al., 2020).

Adam on the NLL of ``target_new`` after each rewrite prompt (all target tokens, teacher forcing); after
every step each weight is clamped to ``[W_0 - norm_constraint, W_0 + norm_constraint]`` (an
L-infinity bound on the change), which is what keeps the edit local.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from rome.locate_edit import EditReport, timed
from util.hparams import HyperParams, require
from util.models import model_device
from util.scoring import left_padded_logits, trailing_target_log_probs
from util.tokens import chunks, prompt_ids, target_ids
from util.weights import weight_parameter


@dataclass
class FTHyperParams(HyperParams):
    layers: List[int]
    rewrite_module_tmp: str
    num_steps: int
    lr: float
    weight_decay: float
    norm_constraint: float
    batch_size: int = 64
    stop_loss: float = 1e-2
    # Accepted for compatibility with the original files.
    layer_module_tmp: Optional[str] = None
    mlp_module_tmp: Optional[str] = None
    attn_module_tmp: Optional[str] = None
    ln_f_module: Optional[str] = None
    lm_head_module: Optional[str] = None
    kl_factor: Optional[float] = None

    def validate(self, source: str) -> None:
        require(len(self.layers) > 0, source, "layers", "must list at least one layer")
        require("{}" in self.rewrite_module_tmp, source, "rewrite_module_tmp", "must contain '{}'")
        require(self.num_steps >= 1, source, "num_steps", "must be >= 1")
        require(self.norm_constraint >= 0, source, "norm_constraint", "must be >= 0")


def apply_ft_to_model(model, tok, requests, hparams: FTHyperParams, context=None, state=None) -> EditReport:
    """Fine-tune the rewrite modules of ``hparams.layers`` in place on all requests of the round."""
    report = EditReport()
    names = [hparams.rewrite_module_tmp.format(layer) for layer in hparams.layers]
    params = [weight_parameter(model, name) for name in names]
    originals = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=hparams.lr, weight_decay=hparams.weight_decay)
    prompts = [r["prompt"].format(r["subject"]) for r in requests]
    targets = [r["target_new"]["str"] for r in requests]
    device = model_device(model)
    steps = 0
    try:
        with timed(report.seconds, "update"):
            for _ in range(hparams.num_steps):
                total = 0.0
                for batch in chunks(list(zip(prompts, targets)), hparams.batch_size):
                    wanted = [target_ids(tok, t) for _, t in batch]
                    rows = [prompt_ids(tok, p) + w for (p, _), w in zip(batch, wanted)]
                    logits = left_padded_logits(model, tok, rows, max(map(len, wanted)) + 1, device)
                    log_probs, row, _ = trailing_target_log_probs(logits, wanted)
                    lengths = torch.tensor([len(w) for w in wanted], device=log_probs.device, dtype=log_probs.dtype)
                    loss = -(log_probs / lengths[row]).sum() / len(batch)  # mean NLL per target, averaged
                    optimizer.zero_grad()
                    loss.backward()
                    optimizer.step()
                    with torch.no_grad():
                        for p, p0 in zip(params, originals):
                            p.copy_(torch.clamp(p, p0 - hparams.norm_constraint, p0 + hparams.norm_constraint))
                    total += float(loss) * len(batch)
                steps += 1
                if total / len(prompts) < hparams.stop_loss:
                    break
    finally:
        for p in params:
            p.requires_grad_(False)
    report.extra["ft_steps"] = steps
    return report
