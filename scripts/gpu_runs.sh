#!/usr/bin/env bash
# The GPU runs behind the README's generated-kernel and apply figures, on a bare GPU machine:
#   source scripts/device_setup.sh && scripts/gpu_runs.sh generic|llama|hf|flce|memory|hf-memory OUT_DIR
# generic: a small bf16 trace of examples/conv_pointwise.py for CI (tests/data), the same script at a
#          GPU-bound size profiled (bench included), `apply --verify` on it, and bench_codegen.py.
#          APPLY_ARGS=--include-estimates also puts in the channels_last change (priced on its transposes).
# llama:   benchmarks/apply_models.py on the two Llamas, then examples/llama_train.py profiled and verified.
# hf:      a tiny HF Llama trace for CI, then examples/hf_train.py profiled and verified for each model.
# flce:    apply_models.py on HF Llama and GPT-2 with the fused linear cross-entropy variants.
# memory:  memory_by_pattern.py (peak memory, one pattern at a time, ours vs Liger), then HF Llama's
#          steps in fresh processes, twice each: eager, ours, ours + fused linear cross-entropy, Liger.
# hf-memory: examples/hf_train.py --model llama profiled, then `apply --verify --memory`.
# kernels: every kernel test on the GPU (no interpreter), then the norm family's sweep (bench_norms.py)
#          and ConvNeXt's channels_first LayerNorm (bench_channel_norm.py).
# zoo:     benchmarks/zoo.py: model families we did not tune on, eager vs whole-model compile vs
#          profile + apply (ZOO_ARGS adds flags, e.g. --models or --resume with ZOO_CSV from an earlier run).
# host:    benchmarks/host_overhead.py --gpu: host µs per call of ours, eager and Liger, the parts (a
#          Triton launch, an autograd.Function) and a cProfile of our LayerNorm's forward + backward.
# verify:  examples profiled, then `apply --verify` (call counts per replacement): nanoGPT's GPT-2
#          under autocast, and the Llama example (VERIFY_MODELS="nanogpt" for one).
# next:    bench_kernels.py on BENCH_PATTERNS (padded_linear: the odd-vocabulary LM heads, eager vs padded
#          vs compile), then the zoo (ZOO_MODELS: BART and Whisper again first, padded_linear's check of
#          2026-12-07 unmeasured on them; then Mixtral, never measured at the current sizes), then the HF
#          patching tests (TESTS_TIMEOUT=0 leaves them out, BENCH_TIMEOUT=0 the bench).
# sweep:   bench_norms.py over issue 14's row lengths (bf16, 65,536 rows) within NORMS_TIMEOUT.
# tiles:   the pipelined norm loops' GPU tests, norm_tune over every row length (TUNE_JOBS compile
#          processes), the table it wrote (OUT/tiles.json), then the sweep with it (COMPILE_JOBS).
#          Then copy OUT/tiles.json over kernels/tiles/<GPU>.json (on an H200 too: it has no table yet).
# tune:    the conv nets' norms where they lost: bench_batch_norm.py (ResNet-50's BN -> ReLU shapes vs eager
#          and compile, then its --sweep of batch_norm_core's tiles and splits) and bench_channel_norm.py
#          --sweep (ConvNeXt's channels_first LayerNorm at each tile and warp count), cross_entropy's
#          bench shapes (GPT-2's vocabulary among them: its backward recomputes since 2026-12-07), then the zoo
#          (ZOO_MODELS, ZOO_BUDGET) with what is left of the window.
# small:   the small launches with their tiles: kernel_split.py and bench_norms.py bf16 at 65,536 rows of 64
#          and 128, then at 4,096 rows (ROWS4K_TIMEOUT) and fp32 at 65,536 rows (FP32_TIMEOUT; 0 leaves either out).
# long:    rows of 16384 (bf16): the backward as shipped against one reading each tile twice (opt-in), tuned.
# rest:    what issue 14's sweep still lacks: 4,096 rows at 2048/128/5120, fp32 at 65,536 rows, compile-max.
# images:  group_norm on image shapes (bench_kernels --only kind=image: PoolFormer's one group a sample, which the
#          sliced plan of 2026-12-07 is for, and a diffusion UNet's), then the zoo's new vision families
#          (ZOO_MODELS, default poolformer,efficientnet) within ZOO_TIMEOUT.
# probe:   where the last losses of issue 14 come from: bandwidth_mix.py (HBM by read:write mix),
#          kernel_split.py (each kernel's time and the launch gaps) for the norms at 65,536 rows of
#          64-256 (SPLIT_SOFTMAX=1: the causal softmax forward's too), norm_tune --small (the tiles of
#          launches of at most 16 MiB, every row length: OUT/tiles-small.json, then removed from the cache),
#          then the softmax bench (bench_kernels.py --patterns softmax).
set -uo pipefail
usage="usage: gpu_runs.sh generic|llama|hf|flce|memory|hf-memory|kernels|zoo|host|verify|next|sweep|tiles|tune|probe|small|long|rest|images OUT_DIR"
phase=${1:?$usage}
out=$(realpath -m "${2:?$usage}")
repo=$(pwd)
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

tuned_tiles_path() {  # where norm_tune writes this GPU's tile table (the user cache dir)
  python3 -c "import torch; from fusion_advisor.kernels import norm_tiles; print(norm_tiles.tuned_path(torch.cuda.get_device_name()))"
}

profile_and_verify() {  # name dir script args...: profile (with bench), then apply --verify
  local name=$1 dir=$2 script=$3; shift 3
  mkdir -p "$out/$name"
  (cd "$dir" && fusion-advisor profile "$script" -o "$out/$name" -- "$@" >"$out/$name/profile.txt" 2>&1)
  echo "$name profile: rc $?"; tail -40 "$out/$name/profile.txt"
  rm -f "$out/$name/trace.json.gz" "$out/$name/run.json"
  (cd "$dir" && fusion-advisor apply "$out/$name/result.json" --verify --steps 20 --warmup 5 ${APPLY_ARGS:-} \
      >"$out/$name/apply-verify.txt" 2>&1)
  echo "$name apply --verify: rc $?"; grep -v '^[-+@ ]' "$out/$name/apply-verify.txt" | tail -25
}

case $phase in
generic)
  tmp=$(mktemp -d)
  fusion-advisor profile examples/conv_pointwise.py --warmup 3 --steps 2 --no-bench -o "$tmp" -- \
      --dtype bfloat16 --steps 8 >"$tmp/out.txt" 2>&1 && cp "$tmp/trace.json.gz" "$out/conv-pointwise-bf16-h200.json.gz"
  echo "fixture: rc $?"
  profile_and_verify conv "$repo/examples" conv_pointwise.py \
      --channels 64 --size 128 --batch 64 --blocks 2 --dtype bfloat16 --steps 30
  timeout 400 python3 benchmarks/bench_codegen.py --kernel-time --json "$out/bench-codegen.json" \
      >"$out/bench-codegen.txt" 2>&1
  echo "bench_codegen: rc $?"; cat "$out/bench-codegen.txt"
  ;;
llama)
  timeout 300 python3 benchmarks/apply_models.py --models llama-example,hf-llama --steps 20 \
      --out "$out/apply-models-llama.csv" >"$out/apply-models-llama.txt" 2>&1
  echo "apply_models: rc $?"; tail -30 "$out/apply-models-llama.txt"
  profile_and_verify llama "$repo/examples" llama_train.py \
      --hidden 2048 --layers 8 --heads 16 --seq 2048 --batch 2 --vocab 32000 --steps 30
  ;;
hf)
  # a small HF Llama trace for CI (its act_fn is a module of its own: SwiGLU spans two modules)
  tmp=$(mktemp -d)
  fusion-advisor profile examples/hf_train.py --warmup 3 --steps 2 --no-bench -o "$tmp" -- --model llama \
      --hidden 256 --layers 2 --heads 4 --seq 128 --batch 2 --vocab 1024 >"$tmp/out.txt" 2>&1 \
      && cp "$tmp/trace.json.gz" "$out/hf-llama-tiny-bf16-h200.json.gz"
  echo "fixture: rc $?"
  for m in ${MODELS:-llama gpt2 bert}; do
    profile_and_verify "hf-$m" "$repo/examples" hf_train.py --model "$m" --steps 30
    rm -f "$out/hf-$m/report.html"
  done
  ;;
flce)
  timeout 500 python3 benchmarks/apply_models.py --models hf-llama,hf-gpt2 --steps 20 \
      --variants eager,fusion-advisor,fusion-advisor+flce,fusion-advisor+flce-fp32acc,liger \
      --out "$out/apply-models-flce.csv" >"$out/apply-models-flce.txt" 2>&1
  echo "apply_models: rc $?"; tail -30 "$out/apply-models-flce.txt"
  ;;
memory)
  timeout 240 python3 benchmarks/memory_by_pattern.py >"$out/memory-by-pattern.txt" 2>&1
  echo "memory_by_pattern: rc $?"; cat "$out/memory-by-pattern.txt"
  timeout 330 python3 benchmarks/apply_models.py --models hf-llama --steps 20 --repeats 2 \
      --variants eager,fusion-advisor,fusion-advisor+flce,liger \
      --out "$out/apply-models-hf-llama.csv" >"$out/apply-models-hf-llama.txt" 2>&1
  echo "apply_models: rc $?"; tail -16 "$out/apply-models-hf-llama.txt"
  ;;
hf-memory)
  # HF Llama profiled (the LM head + loss becomes a measured memory trade), then apply --verify --memory
  APPLY_ARGS=--memory profile_and_verify hf-llama-memory "$repo/examples" hf_train.py --model llama --steps 30
  rm -f "$out/hf-llama-memory/report.html"
  ;;
kernels)
  timeout 200 python3 -m pytest -q -x tests/kernels/test_rms_norm.py tests/kernels/test_add_rms_norm.py tests/kernels/test_layer_norm.py \
      tests/kernels/test_add_layer_norm.py tests/kernels/test_group_norm.py tests/kernels/test_softmax.py tests/kernels/test_cross_entropy.py \
      tests/kernels/test_swiglu.py tests/kernels/test_bias_act.py tests/kernels/test_rope.py tests/kernels/test_codegen.py \
      tests/kernels/test_channel_norm.py tests/kernels/test_packed_glu.py tests/kernels/test_geglu.py \
      >"$out/gpu-tests.txt" 2>&1
  echo "gpu tests: rc $?"; tail -5 "$out/gpu-tests.txt"
  timeout ${NORMS_TIMEOUT:-330} python3 benchmarks/bench_norms.py ${NORMS_ARGS:-} --out "$out/bench-norms.csv" \
      >"$out/bench-norms.txt" 2>&1
  echo "bench_norms: rc $?"; tail -40 "$out/bench-norms.txt"
  timeout 150 python3 benchmarks/bench_channel_norm.py --out "$out/bench-channel-norm.csv" >"$out/bench-channel-norm.txt" 2>&1
  echo "bench_channel_norm: rc $?"; cat "$out/bench-channel-norm.txt"
  ;;
zoo)
  [ -n "${ZOO_CSV:-}" ] && cp "$ZOO_CSV" "$out/zoo.csv"
  timeout ${ZOO_TIMEOUT:-560} python3 benchmarks/zoo.py --out "$out/zoo.csv" --work "$out/work" ${ZOO_ARGS:-} \
      >"$out/zoo.txt" 2>&1
  echo "zoo: rc $?"; tail -45 "$out/zoo.txt"
  # keep the logs, results and apply reports; traces and HTML reports are too big to bring back
  find "$out/work" \( -name '*.json.gz' -o -name '*.html' -o -name 'run.json' \) -delete
  ;;
host)
  timeout 200 python3 benchmarks/host_overhead.py --gpu --calls 300 --repeats 5 --profile layer_norm --anatomy \
      --patterns ${HOST_PATTERNS:-rms_norm,layer_norm,add_layer_norm,softmax,cross_entropy,bias_act,swiglu} \
      >"$out/host-overhead.txt" 2>&1
  echo "host_overhead: rc $?"; head -60 "$out/host-overhead.txt"
  ;;
verify)  # VERIFY_MODELS picks (default: both)
  if [[ " ${VERIFY_MODELS:-nanogpt llama} " == *" nanogpt "* ]]; then
    profile_and_verify nanogpt "$repo/examples" nanogpt_train.py --steps 40
    rm -f "$out/nanogpt/report.html"
  fi
  if [[ " ${VERIFY_MODELS:-nanogpt llama} " == *" llama "* ]]; then
    profile_and_verify llama "$repo/examples" llama_train.py \
        --hidden 2048 --layers 8 --heads 16 --seq 2048 --batch 2 --vocab 32000 --steps 30
    rm -f "$out/llama/report.html"
  fi
  ;;
next)
  # the zoo: the families not measured since their fixes or not at the current sizes, as many as the
  # window allows (rerun with ZOO_MODELS for the rest); then the HF patching tests on the GPU
  if [ "${BENCH_TIMEOUT:-120}" -gt 0 ]; then   # BENCH_TIMEOUT=0 leaves the bench out
    timeout ${BENCH_TIMEOUT:-120} python3 benchmarks/bench_kernels.py --patterns ${BENCH_PATTERNS:-padded_linear} \
        --out "$out/bench-next.csv" >"$out/bench-next.txt" 2>&1
    echo "bench_kernels ${BENCH_PATTERNS:-padded_linear}: rc $?"; tail -14 "$out/bench-next.txt"
  fi
  timeout ${ZOO_TIMEOUT:-440} python3 benchmarks/zoo.py --out "$out/zoo.csv" --work "$out/work" --quick \
      --models ${ZOO_MODELS:-bart,whisper,mixtral} --time-budget ${ZOO_BUDGET:-400} >"$out/zoo.txt" 2>&1
  echo "zoo: rc $?"; tail -20 "$out/zoo.txt"
  # only each model's apply report and profile log come back (the device returns files at most three
  # folders below OUT, and a limited count: pass OUT itself, not a subfolder)
  find "$out/work" -type f ! -name apply.json ! -name profile.log -delete
  find "$out/work" -mindepth 1 -type d -empty -delete
  if [ "${TESTS_TIMEOUT:-100}" -gt 0 ]; then   # TESTS_TIMEOUT=0 leaves the tests out
    timeout ${TESTS_TIMEOUT:-100} python3 -m pytest -q tests/apply/test_patching_hf.py tests/apply/test_patching_structure.py \
        tests/apply/test_patching_batch_norm.py tests/kernels/test_rope.py -k "not hopper" >"$out/gpu-tests-new.txt" 2>&1
    echo "new tests: rc $?"; grep -E "^(FAILED|ERROR)" "$out/gpu-tests-new.txt" | head; tail -2 "$out/gpu-tests-new.txt"
  fi
  ;;
sweep)
  # issue 14's sweep, bf16 at 65,536 rows: every row length of the issue, forward and forward+backward,
  # ours beside eager, torch.compile and Liger (NORMS_ARGS adds flags, e.g. --patterns or --n)
  timeout ${NORMS_TIMEOUT:-560} python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 65536 \
      --time-budget $(( ${NORMS_TIMEOUT:-560} - 30 )) ${NORMS_ARGS:-} --out "$out/bench-norms-sweep.csv" \
      >"$out/bench-norms-sweep.txt" 2>&1
  echo "bench_norms sweep: rc $?"; tail -70 "$out/bench-norms-sweep.txt"
  ;;
tiles)
  # issue 14: the pipelined norm loops on the GPU, then norm_tune's search over every row length (bf16;
  # TUNE_DTYPES) with the candidates compiled in TUNE_JOBS processes; its table comes back as tiles.json
  # (for kernels/tiles/), and the sweep runs with it, compiling its shapes in COMPILE_JOBS processes first
  if [ "${TESTS_TIMEOUT:-120}" -gt 0 ]; then   # TESTS_TIMEOUT=0 leaves the tests out
    timeout ${TESTS_TIMEOUT:-120} python3 -m pytest -q tests/kernels/test_norm_core.py -k "pipelined or every_row_regime" \
        >"$out/gpu-tests-tiles.txt" 2>&1
    echo "pipelined tests: rc $?"; tail -3 "$out/gpu-tests-tiles.txt"
  fi
  timeout ${TUNE_TIMEOUT:-200} python3 -m fusion_advisor.kernels.norm_tune --jobs ${TUNE_JOBS:-12} --verbose \
      --dtypes ${TUNE_DTYPES:-bfloat16} ${TUNE_ARGS:-} >"$out/norm-tune.txt" 2>&1
  echo "norm_tune: rc $?"; grep -E "^  (fwd|bwd)|compiled|wrote|rror" "$out/norm-tune.txt"
  cp "$(tuned_tiles_path)" "$out/tiles.json"
  t=${NORMS_TIMEOUT:-300}
  timeout $t python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 65536 --compile-jobs ${COMPILE_JOBS:-8} \
      --time-budget $((t - 30)) ${NORMS_ARGS:-} --out "$out/bench-norms-sweep.csv" >"$out/bench-norms-sweep.txt" 2>&1
  echo "bench_norms sweep: rc $?"; grep -v "^    (" "$out/bench-norms-sweep.txt" | tail -60
  ;;
probe)
  timeout 60 python3 benchmarks/bandwidth_mix.py >"$out/bandwidth-mix.txt" 2>&1
  echo "bandwidth_mix: rc $?"; cat "$out/bandwidth-mix.txt"
  timeout 90 python3 benchmarks/kernel_split.py --patterns layer_norm,rms_norm,group_norm,add_layer_norm \
      --n 64,128,256 --rows 65536 --providers triton >"$out/kernel-split-norms.txt" 2>&1
  echo "kernel_split norms: rc $?"; cat "$out/kernel-split-norms.txt"
  if [ -n "${SPLIT_SOFTMAX:-}" ]; then   # SPLIT_SOFTMAX=1: the causal softmax forward's kernels too
    for shape in 1,32,4096,4096 4,8,1024,1024; do
      timeout 60 python3 benchmarks/kernel_split.py --patterns softmax --shape $shape --forward-only \
          --providers triton,compile >>"$out/kernel-split-softmax.txt" 2>&1
    done
    echo "kernel_split softmax: rc $?"; cat "$out/kernel-split-softmax.txt"
  fi
  tiles=$(tuned_tiles_path)
  timeout ${SMALL_TUNE_TIMEOUT:-100} python3 -m fusion_advisor.kernels.norm_tune --jobs 12 --verbose --dtypes bfloat16 \
      --small ${SMALL_TUNE_ARGS:-} >"$out/norm-tune-small.txt" 2>&1
  echo "norm_tune small: rc $?"; grep -E "^  (fwd|bwd)|wrote|rror" "$out/norm-tune-small.txt"
  cp "$tiles" "$out/tiles-small.json"; rm -f "$tiles"
  timeout ${SOFTMAX_TIMEOUT:-150} python3 benchmarks/bench_kernels.py --patterns softmax \
      --out "$out/bench-softmax.csv" >"$out/bench-softmax.txt" 2>&1
  echo "bench_kernels softmax: rc $?"; tail -30 "$out/bench-softmax.txt"
  ;;
small)
  # the small launches with their tiles (kernels/tiles/ since 2026-12-07): kernel_split.py at 65,536 rows of 64
  # and 128, bench_norms.py bf16 at 65,536 rows of 64 and 128, then at 4,096 rows (every row length) and
  # fp32 at 65,536 rows within ROWS4K_TIMEOUT and FP32_TIMEOUT (0 leaves either out)
  timeout 45 python3 benchmarks/kernel_split.py --patterns layer_norm,rms_norm,group_norm,add_layer_norm \
      --n 64,128 --rows 65536 --providers triton >"$out/kernel-split-norms.txt" 2>&1
  echo "kernel_split norms: rc $?"; cat "$out/kernel-split-norms.txt"
  timeout 80 python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 65536 --n 64,128 --compile-jobs 10 \
      --out "$out/bench-norms-small.csv" >"$out/bench-norms-small.txt" 2>&1
  echo "bench_norms 65536 rows of 64, 128: rc $?"; grep -v "^    (" "$out/bench-norms-small.txt" | tail -14
  # the same without programmatic dependent launch (the parameter-grad kernel after the backward ends)
  timeout 60 python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 65536 --n 64,128 --providers triton --no-pdl \
      --out "$out/bench-norms-small-nopdl.csv" >"$out/bench-norms-small-nopdl.txt" 2>&1
  echo "bench_norms 65536 rows of 64, 128, no PDL: rc $?"; grep -v "^    (" "$out/bench-norms-small-nopdl.txt" | tail -14
  t=${ROWS4K_TIMEOUT:-300}   # ROWS4K_N: the row lengths at 4,096 rows (default: all 11)
  if [ "$t" -gt 0 ]; then
    timeout $t python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 4096 ${ROWS4K_N:+--n $ROWS4K_N} \
        --compile-jobs 12 --time-budget $((t - 30)) --out "$out/bench-norms-4096.csv" >"$out/bench-norms-4096.txt" 2>&1
    echo "bench_norms 4096 rows: rc $?"; grep -v "^    (" "$out/bench-norms-4096.txt" | tail -14
  fi
  t=${FP32_TIMEOUT:-90}
  if [ "$t" -gt 0 ]; then
    timeout $t python3 benchmarks/bench_norms.py --dtypes float32 --rows 65536 --compile-jobs 12 --time-budget $((t - 20)) \
        --out "$out/bench-norms-fp32.csv" >"$out/bench-norms-fp32.txt" 2>&1
    echo "bench_norms fp32: rc $?"; grep -v "^    (" "$out/bench-norms-fp32.txt" | tail -14
  fi
  ;;
long)
  # rows of 16384 (bf16): the backward as shipped (the tile read once, dweight sums in memory) beside the one
  # that reads each tile twice (RELOAD, opt-in until timed) with both sums in registers, on the shipped tiles;
  # fp32 as shipped; then RELOAD on tiles searched for it (bench_norms --tune: 16 or 32 warps, pipelined or
  # not; the table is left in the cache dir and copied back)
  long=(--n 16384 --rows 8192 --dtypes bfloat16 --patterns layer_norm,add_layer_norm,rms_norm,add_rms_norm,group_norm)
  reload=(--reload-cols 16384 --acc-in-memory-cols 32768)
  timeout 60 python3 -m pytest -q tests/kernels/test_norm_core.py -k "twice or pipelined or registers" \
      >"$out/gpu-tests-long.txt" 2>&1; echo "tests: rc $?"; tail -2 "$out/gpu-tests-long.txt"
  timeout 200 python3 benchmarks/bench_norms.py "${long[@]}" --rows 8192,4096 --providers eager,compile,triton,liger \
      --compile-jobs 10 --time-budget 160 --out "$out/bench-norms-16384.csv" >"$out/bench-norms-16384.txt" 2>&1
  echo "16384 shipped: rc $?"; grep -v "^    (" "$out/bench-norms-16384.txt" | tail -24
  timeout 60 python3 benchmarks/bench_norms.py "${long[@]}" "${reload[@]}" --providers triton \
      --out "$out/bench-norms-16384-reload.csv" >"$out/reload.txt" 2>&1
  echo "16384 reload, shipped tiles: rc $?"; grep -v "^    (" "$out/reload.txt" | tail -12
  # fp32 (ptxas, Triton 3.9: the shipped add + LayerNorm backward at 16384 fp32 and 16 warps spills 1,816 bytes
  # a thread; read twice and pipelined in 2 stages, 8)
  fp32=(--n 16384 --rows 4096 --dtypes float32 --patterns layer_norm,add_layer_norm)
  timeout 70 python3 benchmarks/bench_norms.py "${fp32[@]}" --providers eager,compile,triton --compile-jobs 4 \
      --out "$out/bench-norms-16384-fp32.csv" >"$out/fp32.txt" 2>&1
  echo "16384 fp32 shipped: rc $?"; grep -v "^    (" "$out/fp32.txt" | tail -8
  timeout 150 python3 benchmarks/bench_norms.py "${long[@]}" "${reload[@]}" --tune --providers triton \
      --out "$out/bench-norms-16384-reload-tuned.csv" >"$out/reload-tuned.txt" 2>&1
  echo "16384 reload, tuned: rc $?"; grep -v "^    (" "$out/reload-tuned.txt" | tail -16
  cp "$(python3 -c 'from fusion_advisor.kernels import norm_tiles; import torch
print(norm_tiles.tuned_path(torch.cuda.get_device_name(0)))')" "$out/" 2>/dev/null
  ;;
rest)
  # what issue 14's sweep still lacks on the H100 (2026-12-07): 4,096 rows at 2048, 128 and 5120 (bf16), fp32 at
  # 65,536 rows (FP32_TIMEOUT), then torch.compile(mode="max-autotune-no-cudagraphs") beside ours at three
  # shapes (MAX_TIMEOUT; minutes of autotuning a shape)
  timeout 110 python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 4096 --n 2048,128,5120 --compile-jobs 12 \
      --time-budget 85 --out "$out/bench-norms-4096b.csv" >"$out/bench-norms-4096b.txt" 2>&1
  echo "bench_norms 4096 rows, the rest: rc $?"; grep -v "^    (" "$out/bench-norms-4096b.txt" | tail -12
  t=${FP32_TIMEOUT:-300}
  timeout $t python3 benchmarks/bench_norms.py --dtypes float32 --rows 65536 --compile-jobs 14 --time-budget $((t - 30)) \
      --out "$out/bench-norms-fp32.csv" >"$out/bench-norms-fp32.txt" 2>&1
  echo "bench_norms fp32: rc $?"; grep -v "^    (" "$out/bench-norms-fp32.txt" | tail -14
  t=${MAX_TIMEOUT:-200}
  timeout $t python3 benchmarks/bench_norms.py --dtypes bfloat16 --rows 65536 --n 768,4096 --patterns layer_norm,rms_norm \
      --providers compile,compile-max,triton --time-budget $((t - 20)) --out "$out/bench-norms-max.csv" \
      >"$out/bench-norms-max.txt" 2>&1
  echo "bench_norms compile-max: rc $?"; grep -v "^    (" "$out/bench-norms-max.txt" | tail -8
  ;;
tune)
  timeout 150 python3 benchmarks/bench_batch_norm.py --out "$out/bench-batch-norm.csv" >"$out/bench-batch-norm.txt" 2>&1
  echo "bench_batch_norm: rc $?"; cat "$out/bench-batch-norm.txt"
  timeout 100 python3 benchmarks/bench_batch_norm.py --sweep >"$out/bench-batch-norm-sweep.txt" 2>&1
  echo "bench_batch_norm --sweep: rc $?"; cat "$out/bench-batch-norm-sweep.txt"
  timeout 80 python3 benchmarks/bench_channel_norm.py --sweep >"$out/bench-channel-norm-sweep.txt" 2>&1
  echo "bench_channel_norm --sweep: rc $?"; cat "$out/bench-channel-norm-sweep.txt"
  timeout 150 python3 benchmarks/bench_kernels.py --patterns cross_entropy --out "$out/bench-cross-entropy.csv" \
      >"$out/bench-cross-entropy.txt" 2>&1
  echo "bench_kernels cross_entropy: rc $?"; tail -20 "$out/bench-cross-entropy.txt"
  if [ -n "${ZOO_MODELS:-}" ]; then
    timeout ${ZOO_TIMEOUT:-230} python3 benchmarks/zoo.py --out "$out/zoo.csv" --work "$out/work" --quick \
        --models "$ZOO_MODELS" --time-budget ${ZOO_BUDGET:-200} >"$out/zoo.txt" 2>&1
    echo "zoo: rc $?"; tail -20 "$out/zoo.txt"
    find "$out/work" \( -name '*.json.gz' -o -name '*.html' -o -name 'run.json' \) -delete
  fi
  ;;
images)
  timeout 150 python3 benchmarks/bench_kernels.py --patterns group_norm --only kind=image --providers eager,compile,triton \
      --out "$out/bench-group-norm-images.csv" >"$out/bench-group-norm-images.txt" 2>&1
  echo "bench_kernels group_norm images: rc $?"; tail -20 "$out/bench-group-norm-images.txt"
  timeout ${ZOO_TIMEOUT:-380} python3 benchmarks/zoo.py --out "$out/zoo.csv" --work "$out/work" --quick \
      --models ${ZOO_MODELS:-poolformer,efficientnet} --time-budget $(( ${ZOO_TIMEOUT:-380} - 40 )) >"$out/zoo.txt" 2>&1
  echo "zoo: rc $?"; tail -8 "$out/zoo.txt"
  find "$out/work" -type f ! -name apply.json ! -name profile.log -delete
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
