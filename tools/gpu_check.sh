#!/usr/bin/env bash
# One GPU session's checks: the parity tests on the GPU, then the GPU benchmark suite.
#
#   bash tools/gpu_check.sh wheels          # on a machine with pip access: the packages a bare
#                                           # CUDA image with jax/flax/optax/orbax/transformers/
#                                           # peft/torch lacks, as Python 3.12 wheels in .whl/
#   bash tools/gpu_check.sh [tests|1b|8b|all] [OUT]   # on the GPU machine (default: all)
#
# Logs and the benchmark's JSON go to OUT (default runs/gpu_check): tests.log, versions.txt,
# benchmark-<preset>.log and <gpu-name>-<preset>.json. Each jaxft row prints the planner's
# per-GPU peak (what `--dry_run` reports: XLA:GPU's memory_analysis of the same step) beside
# the measured `peak_bytes_in_use` ("planned MB" and "GPU peak MB"). `all` fits in about 8 minutes on an
# H100/H200: tests ~1 min, the 1B suite ~4, the 8B suite ~3.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=${1:-all}
out=${2:-${OUT:-runs/gpu_check}}

if [[ $stage == wheels ]]; then
  mkdir -p .whl
  # transformers: the image's 5.17 reads GGUF tokenizers differently; 5.24 is the tested floor.
  for pkg in ml-collections==1.1.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 \
      transformers==5.24.0; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
      -d .whl "$pkg" || exit 1
  done
  ls .whl
  exit 0
fi

mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys; print("python", sys.version.split()[0])'
  python3 -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax|transformers|peft|torch|ml.collections|datasets) '
} | tee "$out/versions.txt"
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')

status=0
if [[ $stage == tests || $stage == all ]]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider --continue-on-collection-errors -rs \
    tests/test_gpu.py tests/test_fused_ops.py tests/test_models.py \
    tests/test_peft_training_parity.py tests/test_generate.py 2>&1 | tee "$out/tests.log"
  status=${PIPESTATUS[0]}
fi
for preset in llama1b llama8b; do
  [[ $stage == all || $stage == "${preset#llama}" ]] || continue
  python3 tools/benchmark.py --gpu-suite --suite-presets "$preset" --profile \
    --json "$out/$gpu-$preset.json" 2>&1 | tee "$out/benchmark-$preset.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || status=1
done
exit "$status"
