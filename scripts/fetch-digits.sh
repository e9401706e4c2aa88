#!/usr/bin/env bash
# Extract scikit-learn's handwritten digits (1,797 8x8 images, BSD-licensed) from its PyPI wheel:
# the training data of the bundled models/ddpm-digits. Usage: scripts/fetch-digits.sh [OUT]
set -euo pipefail
out="${1:-data/digits.csv.gz}"
mkdir -p "$(dirname "$out")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: scikit-learn==1.7.2 -d "$tmp"
python3 - "$tmp" "$out" <<'PY'
import glob, sys, zipfile
wheel = glob.glob(sys.argv[1] + "/scikit_learn-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[2], "wb") as f:
    f.write(z.read("sklearn/datasets/data/digits.csv.gz"))
PY
echo "wrote $out"
