#!/usr/bin/env bash
# Record the GPU trace fixtures that CI tests read (tests/data/*.json.gz), on a GPU machine.
#   scripts/record_fixtures.sh DEST_DIR
# Each trace carries the GPU, driver, torch and triton versions in its "fusion_advisor" key.
set -euo pipefail
dest=${1:?usage: record_fixtures.sh DEST_DIR}
mkdir -p "$dest"
gpu=$(python3 -c "import torch; n=torch.cuda.get_device_name(0).lower(); print('h200' if 'h200' in n else 'h100' if 'h100' in n else n.split()[-1])")
run() {  # name script args...
  local name=$1 script=$2; shift 2
  local tmp; tmp=$(mktemp -d)
  fusion-advisor profile "$script" --warmup 3 --steps 2 -o "$tmp" -- "$@" >"$tmp/stdout.txt" 2>"$tmp/stderr.txt" \
    || { cat "$tmp/stderr.txt"; return 1; }
  cp "$tmp/trace.json.gz" "$dest/$name-$gpu.json.gz"
  echo "$name-$gpu.json.gz $(stat -c %s "$dest/$name-$gpu.json.gz") bytes"
}
run llama-bf16 examples/llama_train.py --hidden 1024 --layers 4 --heads 8 --seq 1024 --batch 4 --dtype bfloat16
run llama-fp32 examples/llama_train.py --hidden 1024 --layers 4 --heads 8 --seq 1024 --batch 4 --dtype float32
run gpt-bf16 examples/gpt_train.py --hidden 768 --layers 4 --heads 12 --seq 512 --batch 8 --dtype bfloat16
run gpt-fp32 examples/gpt_train.py --hidden 768 --layers 4 --heads 12 --seq 512 --batch 8 --dtype float32
run llama-tiny-bf16 examples/llama_train.py --hidden 256 --layers 2 --heads 4 --seq 128 --batch 2 --dtype bfloat16
