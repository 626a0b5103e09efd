#!/usr/bin/env bash
# Builds llama.cpp once, from the tree vendored in the llama-cpp-python sdist, so the
# converter, the tools (llama-quantize, llama-imatrix, llama-perplexity, llama-server)
# and the shared libraries that llama-cpp-python loads are one build at one version.
# Result: $ORLIK_CACHE/llama.cpp/<version>-<arch>/ with src/, build/bin/ and a .complete stamp.
# A finished build is reused; an interrupted one is resumed by cmake.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
cache="${ORLIK_CACHE:-$HOME/.cache/orlik}"
root="$cache/llama.cpp/$version-$(uname -m)"
jobs="${ORLIK_BUILD_JOBS:-$(nproc)}"
pip="${PIP:-pip}"

# ggml's AMX kernels segfault in their first matrix multiply on some Sapphire Rapids-class CPUs
# (llama.cpp issue #20824: Q4_K/Q5_K/Q6_K/Q8_0 weights repacked into an AMX buffer), and
# -march=native turns them on wherever the CPU has AMX. orlik builds without them; AVX-512/VNNI
# kernels still run. An explicit -mno-* wins over -march=native in GCC and Clang, in any order.
cflags=""
if [ "$(uname -m)" = x86_64 ] && echo 'int main(void){return 0;}' \
    | "${CC:-cc}" -mno-amx-tile -mno-amx-int8 -mno-amx-bf16 -x c - -o /dev/null 2>/dev/null; then
  cflags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
fi
recipe="native ${cflags}"  # written into .complete: a build made another way is rebuilt
if [ -f "$root/.complete" ] && [ "$(cat "$root/.complete")" = "$recipe" ]; then
  echo "llama.cpp $version: cached build at $root"
  exit 0
fi
[ -f "$root/.complete" ] && echo "llama.cpp $version: the cached build at $root predates its build flags ($recipe); rebuilding"
rm -f "$root/.complete"
mkdir -p "$root"
if [ ! -d "$root/src" ]; then
  echo "llama.cpp $version: fetching the llama-cpp-python sdist (it vendors llama.cpp)"
  tmp="$(mktemp -d)"
  "$pip" download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-"$version".tar.gz -C "$tmp"
  mv "$tmp/llama_cpp_python-$version" "$root/src.partial"
  rm -rf "$tmp"
  mv "$root/src.partial" "$root/src"
fi
cp "$root/src/../src/PKG-INFO" "$root/PKG-INFO" 2>/dev/null || true
echo "llama.cpp $version: building libllama, llama-quantize, llama-imatrix, llama-perplexity and llama-server"
echo "  with $jobs jobs; on 2 cores this takes about 25 minutes the first time, then it is cached in $root"
cmake -S "$root/src/vendor/llama.cpp" -B "$root/build" \
  -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
  -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" >"$root/cmake-configure.log" 2>&1 \
  || { tail -30 "$root/cmake-configure.log"; exit 1; }
cmake --build "$root/build" -j "$jobs" \
  --target llama mtmd llama-quantize llama-imatrix llama-perplexity llama-server 2>&1 \
  | tee "$root/cmake-build.log" | grep --line-buffered -E '^\[ *[0-9]+%\] (Linking|Built target)|error' || true
for t in llama-quantize llama-imatrix llama-perplexity llama-server; do
  [ -x "$root/build/bin/$t" ] || { echo "llama.cpp build failed: $t missing; see $root/cmake-build.log" >&2; exit 1; }
done
echo "$recipe" >"$root/.complete"
echo "llama.cpp $version: built in $root/build/bin"
