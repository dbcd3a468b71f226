#!/usr/bin/env bash
# The GPU measurements of the closing notes (run on the lent GPU machine, results to $OUT):
# 1. benchmark: MEMIT as published (no prefix cache), MEMIT, and the four ECE variants on the same
#    100 real CounterFact edits, one round each, float32;
# 2. the neuron-threshold / lambda sweep of ECE_WI on smollm2-135m: first 200 records of
#    counterfact.json, two sequential rounds of 100.
# Expects the embedded model's GGUF in models_cache/gguf and the data in $ECE_DATA_DIR.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -c "import torch, transformers, sklearn; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
quiet() { grep -v -E "it/s\]|s/it\]|round/s\]|alg/s\]|s/round\]|s/alg\]|^\s*$"; }
timeout 330 python3 experiments/benchmark.py --model_name smollm2-135m --ds_name cf --num_edits 100 --rounds 1 \
    --algs MEMIT:z_prefix_cache=false,MEMIT,ECE_WI,ECE_AS,ECE_RS,ECE_GA --out "$OUT/bench_gpu_100.json" 2>&1 | quiet | tee "$OUT/bench_gpu_100.log"
timeout 200 python3 experiments/benchmark.py --model_name smollm2-135m --ds_name cf --num_edits 100 --rounds 2 \
    --algs ECE_WI,ECE_WI:mom2_update_weight=500,ECE_WI:mom2_update_weight=5000,ECE_WI:neuron_threshold=0.6 \
    --out "$OUT/tune_ece_wi_200.json" 2>&1 | quiet | tee "$OUT/tune_ece_wi_200.log"
