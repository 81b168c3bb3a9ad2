#!/usr/bin/env bash
# throughput.py's build measurements against bergson on a CUDA machine that has no network, plus
# cuda_check.py (GPU rows equal the CPU's). What the machine's image lacks (bergson and its pure-Python
# dependencies, datasets, bm25s, a newer pyarrow) comes as wheels in .whl/ (see benchmarks/README.md).
#
#   benchmarks/throughput_gpu.sh OUT_DIR        # writes OUT_DIR/throughput_gpu_*.json and logs
set -uo pipefail
out=${1:?usage: throughput_gpu.sh OUT_DIR}
mkdir -p "$out"
# a folder named site-packages: dill (datasets' fingerprints) pickles modules from anywhere else by value, which fails on pyarrow's
site=/tmp/wheels/site-packages
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:$site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv
[ "${CHECK:-1}" = 0 ] || python3 benchmarks/cuda_check.py --device cuda 2>&1 | tee "$out/cuda_check.log"   # CHECK=0 skips it
py=$(command -v python3)
# GPT-2 small's shape (12 layers, 768 wide) over 4096 documents of 128 tokens, 32 per batch;
# 64x64 per module as on the CPU; each tool's model in bfloat16, then float32.
common=(--device cuda --layers 12 --embd 768 --heads 12 --docs 4096 --doc-tokens 128 --batch-size 32 --threads 8 --skip-query --bergson-python "$py")
for dtype in bfloat16 float32; do
    timeout 200 python3 benchmarks/throughput.py "${common[@]}" --dtype $dtype --out "$out/throughput_gpu_$dtype.json" 2>"$out/throughput_gpu_$dtype.log"
    echo "exit $?"
done
