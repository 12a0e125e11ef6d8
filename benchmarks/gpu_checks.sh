#!/usr/bin/env bash
# Every GPU measurement and CUDA-path check of this project in one command, for a short lease of a GPU machine.
#
#   OUT=gpu_checks_out bash benchmarks/gpu_checks.sh        # logs and JSON lines land in $OUT
#
# Order = priority: each step has its own time limit so that one slow step cannot starve the rest (about 8 minutes
# in all; warp-lang must be installed for the kernel steps: pip install warp-lang).
#   0. benchmarks/profile_step.py: one `quality` step part by part on a full-size random SD2.1, at 64 and 512 px,
#      and a `low-vram` one at 512 px (with where each preset's peak memory is allocated);
#      steps/s and peak memory of `quality` and `low-vram` with the torch grid and the warp kernels; a 300-step
#      toy-cpu ASD run on CUDA with the warp kernels, scored by benchmarks/score_run.py.
#   1. nerfacc's CUDA extension is JIT-built in the background (CPU work, overlaps the GPU steps; nerfacc 0.5.3
#      ships no prebuilt wheel on PyPI, so this is what a user without one gets on the first `sampler=nerfacc`).
#   2. benchmarks/gpu_memory.py: peak memory and steps/s of `quality` and `low-vram` on a full-size random SD2.1,
#      then with φ on a second (768-v) UNet.
#   3. benchmarks/render_throughput.py on CUDA with the pure-torch marcher.
#   4. the in-process engine tests on CUDA (default_device() is CUDA there; fp16 through precision "auto"),
#      including the CUDA-only ones (nerfacc traversal vs the torch marcher, a CPU NeRF rendered on CUDA). The
#      CLI tests start a Python process each and take minutes there: run the whole suite when time allows.
#   5. render_throughput with nerfacc's traversal, if step 1 built it.
#   6. with WITH_STEP_OVERHEAD=1: benchmarks/step_overhead.py on CUDA with a full-size SD1.5-shaped UNet.
set -u
OUT=${OUT:-$PWD/gpu_checks_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - start)) s (limit $limit s)"
    tail -n 12 "$OUT/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, diffusers, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"

(TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-12} timeout 240 \
    $PY -c "import time; t = time.time(); from nerfacc.cuda._backend import _C; print('nerfacc extension', _C, round(time.time() - t), 's')" \
    >"$OUT/nerfacc_build.log" 2>&1; echo "nerfacc build rc $?" >>"$OUT/nerfacc_build.log") &
build=$!

step profile_64 40 $PY benchmarks/profile_step.py --preset quality --side 64 --prior sd21 --steps 3 --json "$OUT/profile.jsonl"
step profile_512 70 $PY benchmarks/profile_step.py --preset quality --side 512 --prior sd21 --steps 2 --json "$OUT/profile.jsonl"
step profile_512_warp 70 $PY benchmarks/profile_step.py --preset quality --side 512 --prior sd21 --steps 2 --field-backend warp --json "$OUT/profile.jsonl"
step profile_512_lowvram 70 $PY benchmarks/profile_step.py --preset low-vram --side 512 --prior sd21 --steps 2 --field-backend warp --json "$OUT/profile.jsonl"
step memory_torch 80 $PY benchmarks/gpu_memory.py --warmup 1 --steps 3 --field-backend torch
step memory_warp 80 $PY benchmarks/gpu_memory.py --warmup 1 --steps 3 --field-backend warp
step toy_warp_300 100 $PY -m asd_engine text-to-3d --prompt "a red cube" --preset toy-cpu --steps 300 --field-backend warp --out "$OUT/toy_warp_300"
step toy_warp_score 20 $PY benchmarks/score_run.py "$OUT/toy_warp_300"
step gpu_memory_phi_model 90 $PY benchmarks/gpu_memory.py --phi-model --warmup 1 --steps 3
step render_torch 60 $PY benchmarks/render_throughput.py --device cuda --sides 64,256 --quality-side 512 --repeats 3 --backends torch,warp
wait $build
echo "== nerfacc build:"; tail -n 5 "$OUT/nerfacc_build.log"
step pytest_cuda 110 $PY -m pytest -v --timeout 60 tests/test_field_render.py tests/test_export_nodes.py \
    tests/test_prior.py tests/test_distill_math.py tests/test_discriminator.py tests/test_text_to_3d.py tests/test_toy.py
step render_nerfacc 40 $PY benchmarks/render_throughput.py --device cuda --sampler nerfacc --sides 64,256 --quality-side 512 --repeats 3
[ -n "${WITH_STEP_OVERHEAD:-}" ] && step step_overhead_sd15 60 $PY benchmarks/step_overhead.py --device cuda --model-size sd15 --repeats 3
