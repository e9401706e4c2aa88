#!/usr/bin/env bash
# The side-by-side GPU benchmark on a machine with CUDA, PyTorch and no Rust or network
# (docs/benchmarks.md). Expects, relative to the repository root:
#   .gpubin/sd_gpu.xz   `benches/gpu/stage.sh bench`: sd_gpu built with `--features
#                        cuda,autotune-cache` in the `gpu` profile, stripped and xz-compressed
#   .gpubin/environment.tar   optional: CubeCL's autotune cache (`target/environment`) from an
#                        earlier call; the run leaves the updated cache in <out-dir>/environment.tar
#                        (one file: the device tool brings back only a few files, two folders deep)
#   .gpubin/site.tar.xz  diffusers 0.42.1 and importlib_metadata, unpacked wheels
#                        (benches/gpu/stage.sh site); or, as before, their wheels in .whl/
# Usage: benches/gpu/run.sh <out-dir> <what> [sd_gpu flags...]
#   what = rust | python | both; extra flags go to both programs where they share them
#   (--models, --dtypes, --kinds, --iters); RUST_ARGS / PY_ARGS add program-only flags.
#   PROFILE=1 also has CubeCL time every kernel sd_gpu launches (a cubecl.toml at the root):
#   <out-dir>/profile.log.xz gets one line per kernel and, at each synchronisation, a table of
#   the kernels since the last one. Profiling slows the run: use it with few --iters, apart
#   from the timed runs. MEMLOG=1 likewise logs the memory pools' page allocations and
#   cleanups (<out-dir>/memory.log.xz), to see where peak memory comes from.
set -uo pipefail
out=${1:?out dir}; what=${2:?rust|python|both}; shift 2
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv \
    >"$out/gpu.csv" 2>&1
if [[ $what != python ]]; then
    [[ -f .gpubin/environment.tar ]] && mkdir -p target && tar -xf .gpubin/environment.tar -C target
    [[ -x /tmp/sd_gpu ]] || xz -dc .gpubin/sd_gpu.xz >/tmp/sd_gpu && chmod +x /tmp/sd_gpu
    rm -f cubecl.toml
    if [[ ${PROFILE:-0} == 1 ]]; then
        printf '[profiling.logger]\nlevel = "basic"\nfile = "%s"\nappend = true\n' \
            "/tmp/profile.log" >>cubecl.toml
    fi
    if [[ ${MEMLOG:-0} == 1 ]]; then
        printf '[memory.logger]\nlevel = "basic"\nfile = "%s"\nappend = true\n' \
            "/tmp/memory.log" >>cubecl.toml
    fi
    echo "== sd_gpu $* ${RUST_ARGS:-}"
    /tmp/sd_gpu "$@" ${RUST_ARGS:-} 2>"$out/rust.err" | tee -a "$out/rust.jsonl"
    echo "rust exit ${PIPESTATUS[0]}"; tail -5 "$out/rust.err"
    rm -f cubecl.toml
    for log in profile memory; do
        [[ -f /tmp/$log.log ]] && xz -c /tmp/$log.log >"$out/$log.log.xz" && rm /tmp/$log.log
    done
    [[ -d target/environment ]] && tar -cf "$out/environment.tar" -C target environment
fi
if [[ $what != rust ]]; then
    if [[ ! -d /tmp/site ]]; then
        if [[ -f .gpubin/site.tar.xz ]]; then
            mkdir -p /tmp/site && tar -xJf .gpubin/site.tar.xz -C /tmp/site || exit 1
        else
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
                --upgrade --target /tmp/site .whl/*.whl || exit 1
        fi
    fi
    echo "== bench_sd_gpu.py $* ${PY_ARGS:-}"
    PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 python3 benches/python/bench_sd_gpu.py "$@" \
        ${PY_ARGS:-} 2>"$out/python.err" | tee -a "$out/python.jsonl"
    echo "python exit ${PIPESTATUS[0]}"; grep -v "should be kept in float32" "$out/python.err" | tail -5
fi
