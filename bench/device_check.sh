#!/usr/bin/env bash
# GPU checks on a lent H100/H200, stage by stage inside one time budget; results land in $OUT as they are measured.
# By default one device call (9.5 minutes at most) gives a verdict: the GPU tests first (they say whether the speed
# numbers can be trusted), then the bench of five peers; the profile, other peers and other subsets are opt-in.
#   tests    tests/test_gpu.py: CUDA-graph recordings, no re-records, no host sync, static graphs (recaptured when
#            the weights move), tuned variant; with each test's duration (capped at 180 s); then, as a row of its own
#            (capped at 120 s), its settings tests: a LoRA hot-swap and a per-call scale record no CUDA graph
#            (reduce-overhead and static-cudagraphs), a new IP-Adapter scale is captured once, never replayed stale
#   bench    bench/compare.py --subset $SUBSET (default gpu-check: SD2.1 512 fp16 50 DDIM CFG I3B0), peers $PEERS
#            (default eager,deepcache,compile,fastcache,fastcache-static-fused) side by side in one inductor cache
#            (--cache-mode shared: later peers may reuse earlier peers' kernels; each warm-up is still reported),
#            kept under $SCRATCH/inductor/shared
#   serve    (opt-in) bench/cold_start.py: fastcache warmup of $PRESET $SIZE (default sd21 512) batch sizes $BATCHES
#            (default 1,4), 50 steps, guidance on, dynamic batch (the default) then --static-shapes, each cold (an
#            empty --cache-dir) then warm (a restart from it; the restart target is <= 10 s), a new process each, and
#            after each warm restart every bucket timed $REPEATS (default 3) times: cold/warm seconds, compiles and
#            speed per bucket, dynamic against static, in cold_start_gpu.json/.md (at most 450 s of the budget);
#            then bench/serve_load.py against a server warmed from the dynamic run's cache
#   profile  (opt-in) tools/profile_steps.py I3B0 on $PRESET $SIZE (default sd21 512), variant $VARIANT (default
#            fastcache-tuned), reusing the bench's cache; gzipped torch.profiler trace
#   tune     (opt-in) fastcache tune on SD2.1 512 fp16, 50 DDIM steps, CFG 7.5, compiled (reduce-overhead): the 8 first
#            built-in prompts uncached, then I in $INTERVALS (default 2,3,5) x B in $BRANCHES (default 0,1,2); sized
#            (not yet measured) at ~15 s a candidate plus a cold compile per branch: 9 in one device call. Its folder is
#            $SCRATCH/tune, always resumed (with its inductor cache $SCRATCH/inductor/tune): a second call on a warm
#            machine measures only what the first left; tune.md, tune.json, tune.jsonl, tune.png and tune.log in $OUT
# Usage: bash bench/device_check.sh                        (tests, then bench: one device call)
#        BUDGET_S=300 bash bench/device_check.sh profile   (right after, while the machine is still warm)
#        PEERS=all bash bench/device_check.sh bench
#        SUBSET=sdxl-check PRESET=sdxl SIZE=1024 bash bench/device_check.sh bench profile
#        SUBSET=controlnet PEERS=eager,deepcache,compile,fastcache bash bench/device_check.sh bench
#        SUBSET=pipelines PEERS=eager,deepcache,compile,fastcache bash bench/device_check.sh bench   (LoRA, FreeU, ...)
#        bash bench/device_check.sh serve                   (needs the serving wheels, below)
#        bash bench/device_check.sh tune                    (alone: it takes most of a device call)
# BUDGET_S (default 570) bounds the whole script: each stage gets at most what is left, so a device command
# (10 minutes at most) ends with its results written; a stage cut short keeps the peers it finished. It writes
# 8 files at most, what a device call brings back.
#
# The device image has torch and triton but not diffusers or DeepCache. Prepare the wheels here (not committed):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 DeepCache==0.1.1 \
#       torchmetrics==1.9.0 lightning-utilities==0.15.3 peft==0.21.2 accelerate==1.16.0
# fastcache imports peft (LoRA support), and peft imports transformers, accelerate, psutil and yaml: if the image
# lacks transformers, add transformers==5.24.0 and tokenizers (binary wheels) the same way. None of this has been
# tried on the device image yet; the import check below fails in seconds, naming what is missing.
# and for the serve stage, with their dependencies:
#   python3 -m pip download --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl fastapi uvicorn prometheus-client httpx
# and run with carry [".whl"] (WHEELS names another folder; without wheels the install is skipped). Python 3.12
# needs no importlib_metadata backport; a new one imports a package the image lacks. SCRATCH (default /tmp) holds
# the installed wheels, the inductor cache and the trace.
set -uo pipefail
start=$SECONDS
BUDGET_S=${BUDGET_S:-570}
OUT=${OUT:-out/device}
WHEELS=${WHEELS:-.whl}
SCRATCH=${SCRATCH:-/tmp}
SITE=$SCRATCH/site
CACHE=$SCRATCH/inductor
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests bench)
for stage in "${stages[@]}"; do  # a typo fails now, not after minutes of device time
    case "$stage" in
        tests | bench | serve | profile | tune) ;;
        *) echo "unknown stage $stage (tests, bench, serve, profile, tune)" >&2; exit 2 ;;
    esac
done

mkdir -p "$OUT" "$SITE"
wheels=("$WHEELS"/*.whl)
if [ -e "${wheels[0]}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        "${wheels[@]}" || exit 1
else
    echo "no wheels in $WHEELS: install skipped"
fi
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
# fail in seconds, not after a model build, when something the stages import is missing
python3 -c "import diffusers, DeepCache, triton, torch, pytest, matplotlib, pynvml, torchmetrics, peft
import fastcache.variants, fastcache.fused_step, fastcache.tuning.sweep
print('torch', torch.__version__, 'triton', triton.__version__, 'diffusers', diffusers.__version__)" || exit 1
if [[ " ${stages[*]} " == *" serve "* ]]; then
    python3 -c "import fastapi, uvicorn, prometheus_client, httpx" || exit 1
fi

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

for stage in "${stages[@]}"; do
    case "$stage" in
        tests) run 180 python3 -m pytest -q tests/test_gpu.py -k "not settings" -p no:cacheprovider --durations=0 \
                   2>&1 | tee "$OUT/gpu_tests.log"
               run 120 python3 -m pytest -q tests/test_gpu.py -k settings -p no:cacheprovider --durations=0 2>&1 \
                   | tee -a "$OUT/gpu_tests.log" ;;
        bench) run 420 python3 bench/compare.py --subset "${SUBSET:-gpu-check}" \
                   --peers "${PEERS:-eager,deepcache,compile,fastcache,fastcache-static-fused}" \
                   --cache-mode shared --cache-dir "$CACHE" --out "$OUT" 2>&1 | tee "$OUT/bench.log" ;;
        serve) rm -rf "$SCRATCH/cold-start"
               left=$((BUDGET_S - (SECONDS - start)))
               ((left > 450)) && left=450
               # its own budget: no warm-up starts that the timeout would cut; its files are rewritten after each one
               run 450 python3 bench/cold_start.py --preset "${PRESET:-sd21}" --device cuda --size "${SIZE:-512}" \
                   --batch-sizes "${BATCHES:-1,4}" --single= --steps 50 --speed-repeats "${REPEATS:-3}" \
                   --budget-s "$((left - 10))" --cap-s 240 --scratch "$SCRATCH/cold-start" --out "$OUT" --tag gpu \
                   2>&1 | tee "$OUT/serve.log"
               launch=(--preset "${PRESET:-sd21}" --device cuda --sizes "${SIZE:-512}" --batch-sizes "${BATCHES:-1,4}"
                       --steps 50 --edits none --cache-dir "$SCRATCH/cold-start/dynamic-all")
               run 240 python3 bench/serve_load.py --launch "${launch[*]}" --clients 8 --requests 32 --out "$OUT" \
                   2>&1 | tee -a "$OUT/serve.log" ;;
        profile) variant=${VARIANT:-fastcache-tuned}
                 trace=$SCRATCH/trace.json
                 rm -f "$trace"
                 [ -d "$CACHE/shared" ] && export TORCHINDUCTOR_CACHE_DIR=$CACHE/shared \
                     TRITON_CACHE_DIR=$CACHE/shared/triton  # as bench/compare.py's empty_compile_cache
                 run 300 python3 tools/profile_steps.py --preset "${PRESET:-sd21}" --size "${SIZE:-512}" \
                     --variant "$variant" --trace "$trace" --json "$OUT/profile.jsonl" 2>&1 | tee "$OUT/profile.log"
                 unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
                 [ -f "$trace" ] && gzip -c "$trace" > "$OUT/trace.json.gz" ;;
        tune) export TORCHINDUCTOR_CACHE_DIR=$CACHE/tune TRITON_CACHE_DIR=$CACHE/tune/triton
              run 540 python3 -m fastcache.cli tune --preset sd21 --device cuda --size 512 --steps 50 \
                  --intervals "${INTERVALS:-2,3,5}" --branches "${BRANCHES:-0,1,2}" --num-prompts 8 \
                  --out "$SCRATCH/tune" --resume 2>&1 | tee "$OUT/tune.log"
              unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
              for file in tune.md tune.json tune.jsonl tune.png; do  # not reference.npz: 25 MB of float images
                  [ -f "$SCRATCH/tune/$file" ] && cp "$SCRATCH/tune/$file" "$OUT/"
              done ;;
    esac
done
echo "device_check: $((SECONDS - start)) s"
