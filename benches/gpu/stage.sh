#!/usr/bin/env bash
# Builds, on this (CPU-only, Rust) machine, everything the GPU machine runs: the device tool
# carries ignored folders only, and the GPU machine has no Rust and no network.
#
#   .gpubin/sd_gpu.xz        the side-by-side benchmark (benches/gpu/run.sh)
#   .gpubin/kernels.xz       crates/diffusion-core/tests/kernels.rs on CUDA
#   .gpubin/kernel_device.xz crates/diffusion-models/tests/kernel_device.rs on CUDA
#   .gpubin/commit.txt       the commit they were built from (a dirty tree is marked)
#   .whl/*.whl               diffusers (the oracle's pinned version) and importlib_metadata,
#                            for benches/python/bench_sd_gpu.py (PyPI)
#
# Usage: benches/gpu/stage.sh [bench|tests|wheels]...   (all three when none is named)
# Two release builds of burn (the benchmark's feature set and the tests' differ), about 15 min
# each on two cores; CARGO_TARGET_DIR (default target/gpu-cuda) keeps them between runs. The
# `cuda` feature needs no CUDA toolkit: CubeCL loads the driver and compiles kernels at run time.
#
# On the GPU machine, with carry [".gpubin", ".whl"] (64 MiB in all: `du -ch .gpubin .whl`;
# when over, carry the tests and the benchmark in different calls):
#   xz -dc .gpubin/kernels.xz >/tmp/kernels && chmod +x /tmp/kernels &&
#     KERNEL_TEST_DEVICE=cuda /tmp/kernels --test-threads 1
#   xz -dc .gpubin/kernel_device.xz >/tmp/kernel_device && chmod +x /tmp/kernel_device &&
#     KERNEL_TEST_DEVICE=cuda /tmp/kernel_device --test-threads 1   # from the repository root
#   benches/gpu/run.sh $OUT both --models sd15 --kinds unet,vae_decode --dtypes f16
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/gpu-cuda}
what=("$@")
[[ ${#what[@]} -gt 0 ]] || what=(bench tests wheels)
mkdir -p .gpubin .whl
# cubecl-llvm comes with burn's backends; its build script would download LLVM.
bash scripts/setup-llvm.sh >/dev/null

pack() { # pack <executable> <name>: strip, then xz into .gpubin/<name>.xz
    local tmp
    tmp=$(mktemp)
    cp "$1" "$tmp"
    strip "$tmp"
    xz -9e -T2 -c "$tmp" >".gpubin/$2.xz.part"
    mv ".gpubin/$2.xz.part" ".gpubin/$2.xz"
    rm -f "$tmp"
    echo "stage: .gpubin/$2.xz $(du -h ".gpubin/$2.xz" | cut -f1)"
}

# The test executables a `cargo test --no-run` built, from its JSON messages.
test_executables() {
    python3 -c '
import json, sys
for line in sys.stdin:
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
            and msg["target"]["kind"] == ["test"]:
        print(msg["target"]["name"], msg["executable"])
'
}

for step in "${what[@]}"; do
    case $step in
    bench)
        cargo build --release -p diffusion-benches --no-default-features \
            --features cuda,autotune-cache --bin sd_gpu
        pack "$CARGO_TARGET_DIR/release/sd_gpu" sd_gpu
        ;;
    tests)
        # One invocation, so both tests share one feature set and one build of burn.
        cargo test --release -p diffusion-core -p diffusion-models --no-default-features \
            --features diffusion-core/cuda,diffusion-models/cuda \
            --test kernels --test kernel_device --no-run --message-format json-render-diagnostics |
            test_executables >.gpubin/tests.txt
        while read -r name exe; do pack "$exe" "$name"; done <.gpubin/tests.txt
        rm .gpubin/tests.txt
        ;;
    wheels)
        version=$(sed -n 's/^diffusers==//p' fixtures/oracle/requirements.txt)
        python3 -m pip download -q --no-deps -d .whl "diffusers==$version" importlib_metadata
        ls .whl
        ;;
    *)
        echo "stage: unknown step '$step' (bench, tests, wheels)" >&2
        exit 2
        ;;
    esac
done
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- crates benches Cargo.toml Cargo.lock || commit="$commit (dirty tree)"
echo "$commit" >.gpubin/commit.txt
du -ch .gpubin .whl | tail -1
