#!/usr/bin/env bash
# Builds, on this (CPU-only, Rust) machine, everything the GPU machine runs: the device tool
# carries ignored paths only, and the GPU machine has no Rust and no network.
#
#   .gpubin/sd_gpu.xz        the side-by-side benchmark (benches/gpu/run.sh), `gpu` profile
#   .gpubin/kernels.xz       crates/diffusion-core/tests/kernels.rs on CUDA
#   .gpubin/kernel_device.xz crates/diffusion-models/tests/kernel_device.rs on CUDA
#   .gpubin/site.tar.xz      diffusers (the oracle's pinned version) and importlib_metadata from
#                            PyPI, installed with `pip install --target` and packed, for
#                            benches/python/bench_sd_gpu.py (a third of the wheels' size)
#   .gpubin/commit.txt       which commit each binary was built from (a dirty tree is marked)
#
# Usage: benches/gpu/stage.sh [bench|tests|site|budget]...   (all four when none is named)
# Two release builds of burn (the benchmark's profile and the tests' differ), 15-25 min each on
# two cores; CARGO_TARGET_DIR (default target/gpu-cuda) keeps them between runs. The `cuda`
# feature needs no CUDA toolkit: CubeCL loads the driver and compiles kernels at run time.
#
# What travels to the GPU machine in one call, the tracked tree included, is at most 64 MiB;
# the tree is about 36 MiB, so not everything fits in one call. `budget` (run last by default)
# prints the size of each call's carry below and whether it fits. With carry
#   [".gpubin/sd_gpu.xz", ".gpubin/site.tar.xz"]  (+ ".gpubin/environment.tar", if any):
#     benches/gpu/run.sh $OUT both --models sd15 --kinds unet,vae_decode --dtypes f16
#   [".gpubin/kernels.xz"]:
#     xz -dc .gpubin/kernels.xz >/tmp/kernels && chmod +x /tmp/kernels &&
#       KERNEL_TEST_DEVICE=cuda /tmp/kernels --test-threads 1
#   [".gpubin/kernel_device.xz"]:
#     xz -dc .gpubin/kernel_device.xz >/tmp/kernel_device && chmod +x /tmp/kernel_device &&
#       KERNEL_TEST_DEVICE=cuda /tmp/kernel_device --test-threads 1   # from the repository root
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/gpu-cuda}
what=("$@")
[[ ${#what[@]} -gt 0 ]] || what=(bench tests site budget)
mkdir -p .gpubin
# cubecl-llvm comes with burn's backends; its build script would download LLVM.
bash scripts/setup-llvm.sh >/dev/null

# The device tool's limit on what travels in one call, in bytes.
limit=$((64 << 20))
commit=$(git rev-parse --short HEAD)
git diff --quiet HEAD -- crates benches Cargo.toml Cargo.lock || commit="$commit (dirty tree)"

pack() { # pack <executable> <name>: strip, then xz into .gpubin/<name>.xz
    local tmp
    tmp=$(mktemp)
    cp "$1" "$tmp"
    strip "$tmp"
    # The x86 filter and a dictionary as large as the binary: 3% smaller than `xz -9e`.
    xz --x86 --lzma2=preset=9e,dict=192MiB -T1 -c "$tmp" >".gpubin/$2.xz.part"
    mv ".gpubin/$2.xz.part" ".gpubin/$2.xz"
    rm -f "$tmp"
    { grep -v "^$2.xz " .gpubin/commit.txt 2>/dev/null || true; echo "$2.xz $commit"; } \
        >.gpubin/commit.txt.part
    mv .gpubin/commit.txt.part .gpubin/commit.txt
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
        # The `gpu` profile (Cargo.toml) keeps it small. (A non-PIE build would drop 8 MB of
        # relocations, 0.8 MB packed, but turso_sdk_kit's cdylib cannot link without PIC.)
        cargo build --profile gpu -p diffusion-benches --no-default-features \
            --features cuda,autotune-cache --bin sd_gpu
        pack "$CARGO_TARGET_DIR/gpu/sd_gpu" sd_gpu
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
    site)
        version=$(sed -n 's/^diffusers==//p' fixtures/oracle/requirements.txt)
        wheels="$CARGO_TARGET_DIR/wheels"
        python3 -m pip download -q --no-deps -d "$wheels" "diffusers==$version" importlib_metadata
        site=$(mktemp -d)
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --target "$site" "$wheels/diffusers-$version-"*.whl "$wheels"/importlib_metadata-*.whl
        tar -C "$site" -cf - . | xz -9e -T1 >.gpubin/site.tar.xz.part
        mv .gpubin/site.tar.xz.part .gpubin/site.tar.xz
        rm -rf "$site"
        echo "stage: .gpubin/site.tar.xz $(du -h .gpubin/site.tar.xz | cut -f1)"
        ;;
    budget)
        # Tracked files and untracked ones git does not ignore, as the device tool counts.
        tree=$(git ls-files -z --cached --others --exclude-standard |
            xargs -0 stat -c %s 2>/dev/null | awk '{ n += $1 } END { print n }')
        echo "stage: the tracked tree travels with every call: $((tree >> 10)) KiB of $((limit >> 10))"
        for call in "sd_gpu.xz site.tar.xz environment.tar" kernels.xz kernel_device.xz; do
            total=$tree carried=()
            for file in $call; do
                [[ -f .gpubin/$file ]] || continue
                total=$((total + $(stat -c %s ".gpubin/$file")))
                carried+=(".gpubin/$file")
            done
            verdict="fits, $(((limit - total) >> 10)) KiB to spare"
            ((total <= limit)) || verdict="OVER the limit by $(((total - limit) >> 10)) KiB"
            echo "stage: carry ${carried[*]:-nothing}: $((total >> 10)) KiB, $verdict"
        done
        ;;
    *)
        echo "stage: unknown step '$step' (bench, tests, site, budget)" >&2
        exit 2
        ;;
    esac
done
