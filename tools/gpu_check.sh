#!/usr/bin/env bash
# The GPU check (issue 15): one script, under 5 minutes on one GPU, run through the device tool when a session is
# lent one. It prints PASS/FAIL per part, then step time and peak memory; everything also goes to $OUT/gpu_check.log.
#
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=420)
#
# 1. the environment: graftr from this tree (no install step), the GPU machine's own torch; packages that machine
#    lacks (deepspeed, bitsandbytes, peft, lm-eval, trl, datasets, ...) travel as wheels in .whl/ (see the device
#    README for how to download them) and are installed to /tmp/site.
# 2. tests/test_gpu.py: the CUDA paths (bf16 graft equals HF's model on flash SDPA, a 2-step graftr train on one GPU
#    over NCCL, NF4 on CUDA equals bitsandbytes' own layer, checkpointing equals none), skipped on a machine with
#    no GPU (CI).
# 2b. tools/moe_bench.py on the GPU (bf16): LoRA/InA/IA³/scale_bias on every expert of a Qwen3-MoE-shaped model
#    (64 experts, top-8) against PEFT's target_parameters, step time and memory saved for backward.
# 3. a Llama-2-7B-shaped checkpoint with random bf16 weights (tools/random_checkpoint.py --device cuda), then
#    `graftr train` of recipes/ina_llama.yaml on it: bf16, activation checkpointing, 4,096 tokens; and the NF4 base
#    (recipes/ina_llama_nf4.yaml). graftr prints each step's tokens/s and the measured peak (CUDA max allocated).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false TORCH_EXTENSIONS_DIR=/tmp/torch_ext
PY=${PY:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "FAIL wheels"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
status=0
part() {  # part NAME COMMAND...: run it, print PASS/FAIL and its seconds
  local name=$1; shift
  local t0=$SECONDS
  if "$@"; then echo "PASS $name ($((SECONDS - t0)) s)"; else echo "FAIL $name ($((SECONDS - t0)) s)"; status=1; fi
}
$PY - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
for m in ("transformers", "deepspeed", "bitsandbytes", "peft", "datasets", "pydantic"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:  # noqa: BLE001
        print(m, "missing:", type(e).__name__, e)
PY
part tests $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
part moe $PY tools/moe_bench.py --device cuda --dtype bfloat16 --layers 4 --hidden 1024 --intermediate 768 \
  --experts 64 --top-k 8 --batch 8 --seq 512 --rounds 5 --json "$OUT/moe_bench.json"
CKPT=/tmp/llama2-7b-random
part checkpoint $PY tools/random_checkpoint.py meta-llama/Llama-2-7b-hf $CKPT --device cuda
mkdir -p /tmp/data7b
$PY - <<'PY'
import json, random
random.seed(0)
words = open("README.md").read().split()
with open("/tmp/data7b/train.jsonl", "w") as f:
    for _ in range(64):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(6000))}) + "\n")
PY
COMMON=(--model $CKPT --data /tmp/data7b train.precision=bf16 train.micro_batch_size=1 train.data.max_length=4096
        train.data.format=text train.max_steps=4 train.log_every=1 train.lr=1e-4 train.save_every=0)
part 7b-bf16 $PY -m graftr.cli train recipes/ina_llama.yaml --out /tmp/run-bf16 "${COMMON[@]}" \
  train.activation_checkpointing=layers
part 7b-nf4 $PY -m graftr.cli train recipes/ina_llama_nf4.yaml --out /tmp/run-nf4 "${COMMON[@]}" \
  train.activation_checkpointing=layers
for run in /tmp/run-bf16 /tmp/run-nf4; do
  [ -f $run/adapter/manifest.json ] && $PY - "$run" <<'PY'
import json, sys
t = json.load(open(sys.argv[1] + "/adapter/manifest.json"))["training"]
print(sys.argv[1], "tokens/s", round(t["tokens_per_s"]), "peak GiB", [round(p / 2**30, 2) for p in t["peak_memory"]])
PY
done
echo "gpu_check: $([ $status = 0 ] && echo PASS || echo FAIL)"
exit $status
