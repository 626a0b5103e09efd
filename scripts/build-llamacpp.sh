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

if [ -f "$root/.complete" ]; then
  echo "llama.cpp $version: cached build at $root"
  exit 0
fi
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
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >"$root/cmake-configure.log" 2>&1 \
  || { tail -30 "$root/cmake-configure.log"; exit 1; }
cmake --build "$root/build" -j "$jobs" \
  --target llama mtmd llama-quantize llama-imatrix llama-perplexity llama-server 2>&1 \
  | tee "$root/cmake-build.log" | grep --line-buffered -E '^\[ *[0-9]+%\] (Linking|Built target)|error' || true
for t in llama-quantize llama-imatrix llama-perplexity llama-server; do
  [ -x "$root/build/bin/$t" ] || { echo "llama.cpp build failed: $t missing; see $root/cmake-build.log" >&2; exit 1; }
done
touch "$root/.complete"
echo "llama.cpp $version: built in $root/build/bin"
