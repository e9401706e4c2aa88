#!/usr/bin/env bash
# cubecl-llvm (pulled by burn's `cpu` and `cuda` features) downloads an LLVM bundle in its build
# script, which cannot be reached here. Point it at Debian's LLVM 22 instead.
set -euo pipefail
ver=tracel-llvm-23.1.0-4
dest="${HOME}/.local/share/tracel/${ver}"
if [ -f "${dest}/.tracel-llvm-installed" ]; then
  echo "LLVM for cubecl already set up in ${dest}"
  exit 0
fi
if ! [ -x /usr/lib/llvm-22/bin/llvm-config ]; then
  apt-get update -qq
  apt-get install -y -qq llvm-22-dev libpolly-22-dev zlib1g-dev libzstd-dev libxml2-dev \
    libffi-dev libedit-dev libncurses-dev
fi
mkdir -p "${dest}/bin"
ln -sfn /usr/lib/llvm-22/lib "${dest}/lib"
ln -sfn /usr/lib/llvm-22/include "${dest}/include"
cat > "${dest}/bin/llvm-config" <<'WRAP'
#!/usr/bin/env bash
# Debian's llvm-config lists libz3 by absolute path, which the linker flags cannot take.
/usr/lib/llvm-22/bin/llvm-config "$@" | sed -E 's#(^| )/[^ ]*libz3\.so[^ ]*##g'
WRAP
chmod +x "${dest}/bin/llvm-config"
touch "${dest}/.tracel-llvm-installed"
echo "LLVM for cubecl set up in ${dest}"
