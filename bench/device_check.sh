#!/usr/bin/env bash
# The GPU checks in one device call: GPU tests; SD2.1 512 fp16 50 DDIM steps with CFG, diffusers eager vs
# DeepCache vs torch.compile vs fastcache side by side (SUBSET=gpu-check by default); then the step profile with a
# gzipped torch.profiler trace. Results land in $OUT. Budget: about 2 min start-up + 2 + 4 + 3 min.
#
# The device image has torch but not diffusers or DeepCache. Prepare the wheels here first (not committed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 DeepCache==0.1.1 importlib_metadata
# then run it with carry [".whl"]:  bash bench/device_check.sh
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python3 bench/compare.py --subset "${SUBSET:-gpu-check}" --out "$OUT" 2>&1 | tee "$OUT/bench.log"
timeout 240 python3 tools/profile_steps.py --preset sd21 --size 512 --trace /tmp/trace.json --json "$OUT/profile.jsonl" \
    2>&1 | tee "$OUT/profile.log"
[ -f /tmp/trace.json ] && gzip -c /tmp/trace.json > "$OUT/trace.json.gz"
