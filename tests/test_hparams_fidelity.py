"""Our gpt2-xl and Llama3-8B hparams files equal the published ones key for key, except where listed.

The reference values are copied into this file (CI has no copy of the upstream repositories); each table
names the file it was copied from: kmeng01/memit (``memit/...``) or jianghoucheng/AlphaEdit
(``alphaedit/...``). tianyuzhangterry/ECE ships no hparams file: its classes (ECE-WI/WI_hparams.py:8-44,
the same for AS and RS) name the keys of AlphaEdit's NSE files without values, so the ECE files are held
to AlphaEdit's MEMIT files, which ECE extends, and their ECE keys are listed as ours. PRUNE and RECT run
with AlphaEdit's MEMIT files (alphaedit experiments/evaluate.py:95-100 loads hparams/MEMIT/ for every
algorithm whose name contains "MEMIT"); RECT's 40% is hard-coded there (memit/memit_rect_main.py:50).
"""
from __future__ import annotations

import json

import pytest

from util.paths import REPO_ROOT

HPARAMS = REPO_ROOT / "hparams"
ABSENT = object()  # a reference key our file leaves out

# -- Reference tables ------------------------------------------------------------------------------

# memit/hparams/ROME/gpt2-xl.json (alphaedit/hparams/ROME/gpt2-xl.json is identical)
ROME_GPT2XL = {
    "layers": [17], "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5, "v_loss_layer": 47,
    "v_weight_decay": 0.5, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": True,
    "context_template_length_params": [[5, 10], [10, 10]], "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj",
    "layer_module_tmp": "transformer.h.{}", "mlp_module_tmp": "transformer.h.{}.mlp",
    "attn_module_tmp": "transformer.h.{}.attn", "ln_f_module": "transformer.ln_f",
    "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia", "mom2_n_samples": 100000,
    "mom2_dtype": "float32",
}
# alphaedit/hparams/ROME/Llama3-8B.json
ROME_LLAMA3 = {
    "layers": [5], "fact_token": "subject_last", "v_num_grad_steps": 25, "v_lr": 0.5, "v_loss_layer": 31,
    "v_weight_decay": 1e-3, "clamp_norm_factor": 4, "kl_factor": 0.0625, "mom2_adjustment": False,
    "context_template_length_params": [[5, 10], [10, 10]], "rewrite_module_tmp": "model.layers.{}.mlp.down_proj",
    "layer_module_tmp": "model.layers.{}", "mlp_module_tmp": "model.layers.{}.mlp",
    "attn_module_tmp": "model.layers.{}.self_attn", "ln_f_module": "model.norm", "lm_head_module": "lm_head",
    "mom2_dataset": "wikipedia", "mom2_n_samples": 100000, "mom2_dtype": "float32",
}
# memit/hparams/MEMIT/gpt2-xl.json
MEMIT_GPT2XL = {
    "layers": [13, 14, 15, 16, 17], "clamp_norm_factor": 0.75, "layer_selection": "all",
    "fact_token": "subject_last", "v_num_grad_steps": 20, "v_lr": 0.5, "v_loss_layer": 47,
    "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 20000,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte", "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000, "mom2_dtype": "float32",
}
# alphaedit/hparams/MEMIT/gpt2-xl.json: the memit file plus model_name, with lm_head as output module
AE_MEMIT_GPT2XL = {**MEMIT_GPT2XL, "model_name": "gpt2-xl", "lm_head_module": "lm_head"}
# alphaedit/hparams/MEMIT/Llama3-8B.json
AE_MEMIT_LLAMA3 = {
    "model_name": "Llama3-8B", "layers": [4, 5, 6, 7, 8], "clamp_norm_factor": 0.75, "layer_selection": "all",
    "fact_token": "subject_last", "v_num_grad_steps": 25, "v_lr": 0.1, "v_loss_layer": 31,
    "v_weight_decay": 0.5, "kl_factor": 0.0625, "mom2_adjustment": True, "mom2_update_weight": 15000,
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj", "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm", "lm_head_module": "lm_head", "mom2_dataset": "wikipedia",
    "mom2_n_samples": 100000, "mom2_dtype": "float32",
}
# alphaedit/hparams/AlphaEdit/gpt2-xl.json and Llama3-8B.json: AlphaEdit's MEMIT files plus two keys
ALPHAEDIT_GPT2XL = {**AE_MEMIT_GPT2XL, "nullspace_threshold": 2e-2, "L2": 10}
ALPHAEDIT_LLAMA3 = {**AE_MEMIT_LLAMA3, "nullspace_threshold": 2e-2, "L2": 10}
# memit/hparams/FT/gpt2-xl_constr.json (FT-L; same in alphaedit/hparams/FT/)
FT_GPT2XL_CONSTR = {
    "layers": [0], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0, "norm_constraint": 5e-4,
    "rewrite_module_tmp": "transformer.h.{}.mlp.c_proj", "layer_module_tmp": "transformer.h.{}",
    "mlp_module_tmp": "transformer.h.{}.mlp", "attn_module_tmp": "transformer.h.{}.attn",
    "ln_f_module": "transformer.ln_f", "lm_head_module": "transformer.wte",
}
# memit/hparams/FT/gpt2-xl_unconstr.json (FT; same in alphaedit/hparams/FT/)
FT_GPT2XL_UNCONSTR = {**FT_GPT2XL_CONSTR, "layers": [1], "norm_constraint": False}
# alphaedit/hparams/FT/Llama3-8B.json (FT, unconstrained: the "FT" rows of AlphaEdit's tables)
FT_LLAMA3 = {
    "layers": [21], "num_steps": 25, "lr": 5e-4, "weight_decay": 0, "kl_factor": 0, "norm_constraint": False,
    "rewrite_module_tmp": "model.layers.{}.mlp.down_proj.weight", "layer_module_tmp": "model.layers.{}",
    "mlp_module_tmp": "model.layers.{}.mlp", "attn_module_tmp": "model.layers.{}.self_attn",
    "ln_f_module": "model.norm", "lm_head_module": "lm_head",
}

# -- Differences kept, each with its reason ---------------------------------------------------------

NO_MODEL_NAME = {"model_name": (ABSENT, "editing/hparams.py LocateEditHyperParams rejects unknown keys and has no "
                                        "model_name; upstream reads it only to lay out its C_prev cache "
                                        "(alphaedit experiments/evaluate.py:196-203), util/weights.py does that")}
SAMPLE_LENGTH = {"mom2_sample_length": (1024, "ours, no upstream key: C0 is measured on packed chunks of this "
                                              "many tokens; upstream truncates each article at the model's "
                                              "context (alphaedit rome/layer_stats.py:105-112); 100000 x 1024 "
                                              "tokens is the same order as upstream's 100000 articles")}
ECE_KEYS = {key: (value, "ECE's own key (ece/hparams.py); the ECE repo ships no values")
            for key, value in {"neuron_threshold": 0.8, "ig_steps": 0, "n_clusters": None, "max_clusters": 10,
                               "z_mode": "per_request", "z_batch_size": None, "max_iterations": 1,
                               "alpha": 0.0, "upper_bound": None}.items()}
MODULE_NOT_PARAMETER = {"rewrite_module_tmp": ("model.layers.{}.mlp.down_proj",
                                               "our FT and driver name the module; upstream's substring match "
                                               "on parameter names selects the same down_proj.weight (no bias)")}
FT_L_LLAMA3 = {"layers": ([0], "FT-L: no upstream file for Llama3-8B; layer 0 as in every upstream FT-L file"),
               "norm_constraint": (5e-5, "FT-L: unswept; GPT-J-6B's published bound, the nearest size "
                                         "(memit/hparams/FT/EleutherAI_gpt-j-6B_constr.json)")}
RECT_KEY = {"top_k_percent": (40.0, "RECT's k_percent, hard-coded upstream (alphaedit memit/memit_rect_main.py:50)")}

# our file -> (reference table, kept differences)
TABLE = {
    "ROME/gpt2-xl.json": (ROME_GPT2XL, SAMPLE_LENGTH),
    "ROME/Llama3-8B.json": (ROME_LLAMA3, SAMPLE_LENGTH),
    "MEMIT/gpt2-xl.json": (MEMIT_GPT2XL, SAMPLE_LENGTH),
    "MEMIT/Llama3-8B.json": (AE_MEMIT_LLAMA3, {**NO_MODEL_NAME, **SAMPLE_LENGTH}),
    "AlphaEdit/gpt2-xl.json": (ALPHAEDIT_GPT2XL, {**NO_MODEL_NAME, **SAMPLE_LENGTH}),
    "AlphaEdit/Llama3-8B.json": (ALPHAEDIT_LLAMA3, {**NO_MODEL_NAME, **SAMPLE_LENGTH}),
    "MEMIT_prune/gpt2-xl.json": (AE_MEMIT_GPT2XL, {**NO_MODEL_NAME, **SAMPLE_LENGTH}),
    "MEMIT_prune/Llama3-8B.json": (AE_MEMIT_LLAMA3, {**NO_MODEL_NAME, **SAMPLE_LENGTH}),
    "MEMIT_rect/gpt2-xl.json": (AE_MEMIT_GPT2XL, {**NO_MODEL_NAME, **SAMPLE_LENGTH, **RECT_KEY}),
    "MEMIT_rect/Llama3-8B.json": (AE_MEMIT_LLAMA3, {**NO_MODEL_NAME, **SAMPLE_LENGTH, **RECT_KEY}),
    "FT/gpt2-xl.json": (FT_GPT2XL_CONSTR, {}),
    "FT/gpt2-xl_unconstr.json": (FT_GPT2XL_UNCONSTR, {}),
    "FT/Llama3-8B.json": (FT_LLAMA3, {**MODULE_NOT_PARAMETER, **FT_L_LLAMA3}),
    "FT/Llama3-8B_unconstr.json": (FT_LLAMA3, MODULE_NOT_PARAMETER),
    "ECE/gpt2-xl.json": (AE_MEMIT_GPT2XL, {**NO_MODEL_NAME, **SAMPLE_LENGTH, **ECE_KEYS}),
    "ECE/Llama3-8B.json": (AE_MEMIT_LLAMA3, {**NO_MODEL_NAME, **SAMPLE_LENGTH, **ECE_KEYS}),
}


def same(a, b) -> bool:
    """Equal values of the same JSON kind: 4 == 4.0, but false != 0 (FT reads false as 'no bound')."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


def differences(ours: dict, reference: dict, kept: dict) -> list:
    """Every key where ``ours`` differs from ``reference`` with the listed differences applied."""
    expected = dict(reference)
    for key, (value, _reason) in kept.items():
        if value is ABSENT:
            expected.pop(key, None)
        else:
            expected[key] = value
    missing = object()
    return [f"{key}: ours {ours.get(key, '<absent>')!r}, expected {expected.get(key, '<absent>')!r}"
            for key in sorted(set(ours) | set(expected))
            if not same(ours.get(key, missing), expected.get(key, missing))]


def test_every_gpt2xl_and_llama3_file_is_in_the_table():
    found = {str(p.relative_to(HPARAMS)) for pattern in ("*/gpt2-xl*.json", "*/Llama3-8B*.json")
             for p in HPARAMS.glob(pattern)}
    assert found == set(TABLE)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_file_equals_reference_except_listed(name):
    reference, kept = TABLE[name]
    ours = json.loads((HPARAMS / name).read_text())
    assert differences(ours, reference, kept) == []
    assert all(reason for _, reason in kept.values())


@pytest.mark.parametrize("name", sorted(TABLE))
def test_file_loads_with_its_algorithms(name):
    from experiments.algorithms import algorithm_names, get_algorithm

    folder = name.split("/")[0]
    algorithms = [a for a in map(get_algorithm, algorithm_names()) if a.hparams_dir_name == folder]
    assert algorithms, f"no algorithm reads hparams/{folder}/"
    for algorithm in algorithms:
        hparams = algorithm.hparams_class.from_json(HPARAMS / name)
        assert hparams.layers == json.loads((HPARAMS / name).read_text())["layers"]


def test_comparison_catches_a_changed_value_a_new_key_and_false_for_zero():
    ours = {**FT_GPT2XL_UNCONSTR}
    assert differences(ours, FT_GPT2XL_UNCONSTR, {}) == []
    assert differences({**ours, "lr": 1e-3}, FT_GPT2XL_UNCONSTR, {}) == ["lr: ours 0.001, expected 0.0005"]
    assert differences({**ours, "norm_constraint": 0}, FT_GPT2XL_UNCONSTR, {}) == [
        "norm_constraint: ours 0, expected False"]
    assert len(differences({**ours, "batch_size": 8}, FT_GPT2XL_UNCONSTR, {})) == 1
    without = {k: v for k, v in AE_MEMIT_GPT2XL.items() if k != "model_name"}
    assert differences(without, AE_MEMIT_GPT2XL, {}) == ["model_name: ours '<absent>', expected 'gpt2-xl'"]
    assert differences(without, AE_MEMIT_GPT2XL, NO_MODEL_NAME) == []
