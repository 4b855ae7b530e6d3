#!/usr/bin/env bash
# Every check of this project that needs a GPU, in one run on a machine with one (about 10 minutes on an H200):
# the test suite's GPU tests, the layer benchmark, the end-to-end benchmark (eager, compiled and CUDA graphs;
# batches copied from host memory and cut on the device) and the blog's memory with torch.cuda.memory_allocated.
#
#   bash benchmarks/gpu.sh [DATA_DIR] [OUT_DIR]
#
# DATA_DIR is a torchvision root holding FashionMNIST/raw (default: bn_lightning's own choice, data/ first);
# OUT_DIR gets each step's log and results (default: benchmarks/results/gpu). The Python that runs it must
# have torch with CUDA and the project's dependencies (pip install -e .).
set -eu -o pipefail
cd "$(dirname "$0")/.."
DATA=${1:-$(python3 -c "from bn_lightning.training.data import resolve_data_dir; print(resolve_data_dir())")}
OUT_DIR=${2:-benchmarks/results/gpu}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print(torch.__version__, torch.cuda.get_device_name())"

# The tests that skip without a GPU, run where they do not.
python3 -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning -rs -m gpu tests 2>&1 | tee "$OUT_DIR/tests.log"
python3 benchmarks/bn.py --device cuda 2>&1 | tee "$OUT_DIR/bn.log"
python3 benchmarks/end_to_end.py --data-dir "$DATA" --accelerator gpu --modes default reduce-overhead \
    --data host device --steps 200 --repeats 3 2>&1 | tee "$OUT_DIR/end_to_end.log"
python3 benchmarks/blog_memory.py --device cuda --data-dir "$DATA" --train-steps 500 --test-images 2000 --epochs 3 \
    --out "$OUT_DIR/blog_oom" 2>&1 | tee "$OUT_DIR/blog_memory.log"
cp benchmarks/results/bn.md benchmarks/results/end_to_end.md "$OUT_DIR"/
