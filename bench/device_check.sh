#!/usr/bin/env bash
# GPU checks on a lent H100/H200, stage by stage inside one time budget; results land in $OUT as they are measured.
#   bench    bench/compare.py --subset $SUBSET (default gpu-check: SD2.1 512 fp16 50 DDIM CFG I3B0), the default
#            peers side by side, each compiled peer cold in its own inductor cache, kept under /tmp/inductor
#   profile  tools/profile_steps.py I3B0 on $PRESET $SIZE (default sd21 512), variant $VARIANT (default
#            fastcache-tuned), reusing the bench's cache for that variant; gzipped torch.profiler trace
#   tests    tests/test_gpu.py: CUDA-graph recordings, no re-records, no host sync, static graphs (recaptured when
#            the weights move), tuned variant; with each test's duration
# Usage: bash bench/device_check.sh                        (bench, then profile: one device call)
#        BUDGET_S=240 bash bench/device_check.sh tests     (right after, while the machine is still warm)
#        PEERS=all bash bench/device_check.sh bench
#        SUBSET=sdxl-check PRESET=sdxl SIZE=1024 bash bench/device_check.sh bench profile
# BUDGET_S (default 570) bounds the whole script: each stage gets at most what is left, so a device command
# (10 minutes at most) ends with its results written; a stage cut short keeps the peers it finished. It writes
# 8 files at most, what a device call brings back.
#
# The device image has torch and triton but not diffusers or DeepCache. Prepare the wheels here (not committed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 DeepCache==0.1.1
# and run with carry [".whl"]. (Python 3.12 needs no importlib_metadata backport; a new one imports a package the
# image lacks.)
set -uo pipefail
start=$SECONDS
BUDGET_S=${BUDGET_S:-570}
OUT=${OUT:-out/device}
CACHE=/tmp/inductor
mkdir -p "$OUT" /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
ln -sfn "$PWD/kernels" /tmp/site/fastcache_kernels  # the name `pip install .` gives the kernels folder
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# fail in seconds, not after a model build, when something the stages import is missing
python3 -c "import diffusers, DeepCache, triton, torch, pytest, matplotlib, pynvml, fastcache.variants, fastcache.fused_step
print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" || exit 1

# run CAP COMMAND...: the command under a timeout of CAP seconds or what is left of the budget, whichever is less
run() {
    local cap=$1 left=$((BUDGET_S - (SECONDS - start)))
    shift
    ((left < cap)) && cap=$left
    if ((cap < 30)); then
        echo "skipped, ${left} s of the budget left: $*"
        return 0
    fi
    timeout "$cap" "$@"
}

stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(bench profile)
for stage in "${stages[@]}"; do
    case "$stage" in
        bench) run 420 python3 bench/compare.py --subset "${SUBSET:-gpu-check}" ${PEERS:+--peers "$PEERS"} \
                   --cache-dir "$CACHE" --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
        profile) variant=${VARIANT:-fastcache-tuned}
                 rm -f /tmp/trace.json
                 [ -d "$CACHE/$variant" ] && export TORCHINDUCTOR_CACHE_DIR=$CACHE/$variant \
                     TRITON_CACHE_DIR=$CACHE/$variant/triton  # as bench/compare.py's fresh_compile_cache
                 run 300 python3 tools/profile_steps.py --preset "${PRESET:-sd21}" --size "${SIZE:-512}" --variant "$variant" \
                     --trace /tmp/trace.json --json "$OUT/profile.jsonl" 2>&1 | tee "$OUT/profile.log"
                 unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
                 [ -f /tmp/trace.json ] && gzip -c /tmp/trace.json > "$OUT/trace.json.gz" ;;
        tests) run 300 python3 -m pytest -q tests/test_gpu.py -p no:cacheprovider --durations=0 2>&1 | tee "$OUT/gpu_tests.log" ;;
        *) echo "unknown stage $stage (bench, profile, tests)" >&2; exit 2 ;;
    esac
done
echo "device_check: $((SECONDS - start)) s"
