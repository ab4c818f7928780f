#!/usr/bin/env bash
# The prepared check for a lent GPU (or TPU) machine: at most 8 minutes, one command.
#
#   bash benchmarks/accelerator_check.sh            # on the accelerator host, from anywhere
#   ACCEL_CHECK_PRESET=cpu bash benchmarks/accelerator_check.sh   # a dry run on a CPU machine
#
# Prints, at the papers' shapes (benchmarks/scaling.py --preset=paper):
#   FRePo's outer step, CIFAR-10 IPC 10, pool ConvNet width 128, real batch 1024;
#   one MTT iteration, CIFAR-10 IPC 10, N = 30 student steps, width 128, remat on;
#   one training step of 8 evaluation networks vmapped (width 128);
# each as ms/step, XLA's per-device memory estimate, the device's peak memory and the fraction of
# a 2048x2048 float32 matmul's FLOP/s measured in the same run; on all devices of the host and on
# 1 device. Then the evaluation throughput of 5 networks vmapped against a Python loop
# (benchmarks/eval_throughput.py, mtt protocol, width 128).
#
# The lent machines have JAX with CUDA but no internet: packages distill_jax needs that are not
# there (ml-collections, tensorboardX, submitit, tensorflow-datasets) travel as wheels in .whl/
# (the device tool's README says how to download them); they are installed into /tmp/site here.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
preset="${ACCEL_CHECK_PRESET:-paper}"
python3 - <<'PY'
import jax
print("jax", jax.__version__, "devices:", jax.devices())
PY
timeout 360 python3 benchmarks/scaling.py --preset="$preset" --steps=5
if [ "$preset" = paper ]; then
  timeout 100 python3 benchmarks/eval_throughput.py --num_models=5 --steps=100
else
  timeout 100 python3 benchmarks/eval_throughput.py --small
fi
