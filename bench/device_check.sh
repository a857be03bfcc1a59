#!/usr/bin/env bash
# GPU checks on a lent H100/H200, by stage, each under its own timeout; results land in $OUT.
#   tests    tests/test_gpu.py: CUDA-graph recordings, no re-records, no host sync, static graphs, tuned variant (~4 min)
#   bench    bench/compare.py --subset $SUBSET (default gpu-check: SD2.1 512 fp16 50 DDIM CFG), the default
#            peers side by side, each compiled peer cold in its own inductor cache                 (~6 min)
#   profile  tools/profile_steps.py on SD2.1 512 I3B0, variant $VARIANT (default fastcache-tuned), with a gzipped
#            torch.profiler trace                                                                    (~3 min)
# Usage: bash bench/device_check.sh tests bench      (a device command may run 10 minutes: split stages)
#        PEERS=all SUBSET=targets bash bench/device_check.sh bench   (every peer; default: bench's DEFAULT_PEERS)
#
# The device image has torch and triton but not diffusers or DeepCache. Prepare the wheels here (not committed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#       diffusers==0.42.1 DeepCache==0.1.1 importlib_metadata
# and run with carry [".whl"].
set -uo pipefail
OUT=${OUT:-out/device}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench)
for stage in "${stages[@]}"; do
    case "$stage" in
        tests) timeout 300 python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" ;;
        bench) timeout 420 python3 bench/compare.py --subset "${SUBSET:-gpu-check}" ${PEERS:+--peers "$PEERS"} \
                   --out "$OUT" 2>&1 \
                   | tee "$OUT/bench.log" ;;
        profile) timeout 300 python3 tools/profile_steps.py --preset sd21 --size 512 \
                     --variant "${VARIANT:-fastcache-tuned}" --trace /tmp/trace.json \
                     --json "$OUT/profile.jsonl" 2>&1 | tee "$OUT/profile.log"
                 [ -f /tmp/trace.json ] && gzip -c /tmp/trace.json > "$OUT/trace.json.gz" ;;
        *) echo "unknown stage $stage (tests, bench, profile)" >&2; exit 2 ;;
    esac
done
