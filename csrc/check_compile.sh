#!/usr/bin/env bash
# Compile (never run) every csrc/ translation unit with nvcc, against the headers of the
# nvidia-nvshmem-cu13 wheel and torch's include paths; then
#   - device-link the .cu objects against the wheel's libnvshmem_device.a (unresolved NVSHMEM
#     device symbols fail),
#   - link the whole extension .so (bindings + objects + libnvshmem_host.so.3 + cudart + torch) and
#     import it in Python (RTLD_NOW: every host symbol must resolve; the pybind11 module must
#     register). No kernel runs: there is no GPU. Skip this step with STREAMATTN_CSRC_NO_LINK=1.
# Exits non-zero on any error. CI: `bash csrc/check_compile.sh`.
#
# Env: PYTHON (default /work/venv/bin/python if present, else python3), NVCC (default: PATH, then
#      /usr/local/cuda/bin/nvcc), STREAMATTN_NVSHMEM_VERSION (default 3.8.0), CUDA_ARCH (default
#      sm_90), STREAMATTN_CACHE_DIR (default ~/.cache/streamattn). The wheel (~180 MB) is downloaded
#      once with `pip download --no-deps` into $STREAMATTN_CACHE_DIR/wheels; only include/ and
#      libnvshmem_device.a are unpacked (to $STREAMATTN_CACHE_DIR/nvshmem-<version>).
# Exit 2 (with a message) when nvcc is absent, so callers can tell "cannot check" from "broken".
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x /work/venv/bin/python ]]; then PYTHON=/work/venv/bin/python; else PYTHON=python3; fi
fi
NVSHMEM_VERSION="${STREAMATTN_NVSHMEM_VERSION:-3.8.0}"
ARCH="${CUDA_ARCH:-sm_90}"
CACHE="${STREAMATTN_CACHE_DIR:-$HOME/.cache/streamattn}"

NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -x /usr/local/cuda/bin/nvcc ]]; then NVCC=/usr/local/cuda/bin/nvcc; fi
if [[ -z "$NVCC" ]]; then
  echo "check_compile: nvcc not found (set NVCC=...); cannot compile csrc/" >&2
  exit 2
fi

# ---- the NVSHMEM wheel, cached
ROOT="$CACHE/nvshmem-$NVSHMEM_VERSION"
INC="$ROOT/nvidia/nvshmem/include"
LIBDIR="$ROOT/nvidia/nvshmem/lib"
LIBDEV="$LIBDIR/libnvshmem_device.a"
LIBHOST="$LIBDIR/libnvshmem_host.so.3"
if [[ ! -f "$INC/nvshmem.h" || ! -f "$LIBDEV" || ! -f "$LIBHOST" ]]; then
  (umask 077 && mkdir -p "$CACHE/wheels")   # owner-only, like the caches streamattn writes
  shopt -s nullglob
  wheels=("$CACHE"/wheels/nvidia_nvshmem_cu13-"$NVSHMEM_VERSION"-*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "check_compile: downloading nvidia-nvshmem-cu13==$NVSHMEM_VERSION (once, cached in $CACHE/wheels)"
    "$PYTHON" -m pip download --quiet --no-deps "nvidia-nvshmem-cu13==$NVSHMEM_VERSION" -d "$CACHE/wheels"
    wheels=("$CACHE"/wheels/nvidia_nvshmem_cu13-"$NVSHMEM_VERSION"-*.whl)
  fi
  (( ${#wheels[@]} > 0 )) || { echo "check_compile: no nvshmem wheel after download" >&2; exit 1; }
  tmpx="$(mktemp -d "$CACHE/.unpack.XXXXXX")"
  "$PYTHON" - "${wheels[0]}" "$tmpx" <<'PY'
import sys, zipfile
whl, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as z:
    keep = ("nvidia/nvshmem/lib/libnvshmem_device.a", "nvidia/nvshmem/lib/libnvshmem_host.so.3")
    names = [n for n in z.namelist() if n.startswith("nvidia/nvshmem/include/") or n in keep]
    z.extractall(dest, names)
PY
  rm -rf "$ROOT" && mv "$tmpx" "$ROOT"   # atomic-ish: a half-unpacked tree is never used
fi

# ---- torch / python include paths (CPU torch is fine: bindings.cpp needs no c10/cuda headers)
mapfile -t TORCH_INC < <("$PYTHON" -c "
import sysconfig, torch
from torch.utils.cpp_extension import include_paths
for p in include_paths(): print(p)
print(sysconfig.get_paths()['include'])
print('ABI=' + str(int(torch._C._GLIBCXX_USE_CXX11_ABI)))
")
ABI="${TORCH_INC[-1]#ABI=}"; unset 'TORCH_INC[-1]'
TORCH_FLAGS=()
for p in "${TORCH_INC[@]}"; do TORCH_FLAGS+=("-I$p"); done
TORCH_LIB="$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))")"
CUDA_ROOTS=("${CUDA_HOME:-}" "$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)" /usr/local/cuda)

OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
fail=0
shopt -s nullglob
units=("$HERE"/*.cu "$HERE"/*.cpp)
(( ${#units[@]} > 0 )) || { echo "check_compile: no translation units in $HERE" >&2; exit 1; }
echo "check_compile: $("$NVCC" --version | tail -1), NVSHMEM $NVSHMEM_VERSION headers, -arch=$ARCH"
# The units compile in parallel (one per core on CI's 2 cores: bindings.cpp with torch's headers
# takes most of the time); each one's result and log are reported in unit order afterwards.
pids=()
for src in "${units[@]}"; do
  name="$(basename "$src")"
  obj="$OUT/${name%.*}.o"
  case "$name" in
    *.cu)   # NVSHMEM device code: relocatable device code, as the real build uses
      cmd=("$NVCC" -c -arch="$ARCH" -rdc=true -std=c++20 -Xcompiler -fPIC -Werror all-warnings
           -I"$HERE" -I"$INC" -o "$obj" "$src") ;;
    *.cpp)  # torch binding: nvcc hands .cpp to the host compiler, with torch's flags
      cmd=("$NVCC" -c -arch="$ARCH" -std=c++20 -Xcompiler -fPIC -D_GLIBCXX_USE_CXX11_ABI="$ABI"
           -DTORCH_EXTENSION_NAME=_nvshmem_ext -DTORCH_API_INCLUDE_EXTENSION_H
           -I"$HERE" "${TORCH_FLAGS[@]}" -o "$obj" "$src") ;;
  esac
  ( start=$SECONDS; "${cmd[@]}" > "$OUT/$name.log" 2>&1; rc=$?; echo "$((SECONDS - start))" > "$OUT/$name.secs"; exit $rc ) &
  pids+=($!)
done
for i in "${!units[@]}"; do
  name="$(basename "${units[$i]}")"
  if wait "${pids[$i]}"; then
    cat "$OUT/$name.log"
    echo "  ok    $name ($(cat "$OUT/$name.secs" 2>/dev/null || echo ?) s)"
  else
    cat "$OUT/$name.log" >&2
    echo "  FAIL  $name" >&2
    fail=1
  fi
done

# ---- device link: every NVSHMEM device symbol the .cu objects use must resolve
cu_objs=()
for src in "$HERE"/*.cu; do
  o="$OUT/$(basename "${src%.*}").o"
  [[ -f "$o" ]] && cu_objs+=("$o")
done
if (( fail == 0 && ${#cu_objs[@]} > 0 )); then
  if "$NVCC" -arch="$ARCH" -dlink -Xcompiler -fPIC "${cu_objs[@]}" "$LIBDEV" -o "$OUT/dlink.o"; then
    echo "  ok    device link against libnvshmem_device.a"
  else
    echo "  FAIL  device link" >&2
    fail=1
  fi
fi

# ---- link the extension and import it (no GPU needed for loading; nothing is launched)
if (( fail == 0 )) && [[ "${STREAMATTN_CSRC_NO_LINK:-0}" != "1" ]]; then
  cudart_dir=""
  for r in "${CUDA_ROOTS[@]}"; do
    [[ -n "$r" ]] || continue
    for d in "$r/lib64" "$r/targets/x86_64-linux/lib" "$r/lib"; do
      if [[ -z "$cudart_dir" ]] && compgen -G "$d/libcudart.so*" > /dev/null; then cudart_dir="$d"; fi
    done
  done
  if [[ -z "$cudart_dir" ]]; then
    echo "  FAIL  link: libcudart.so not found under ${CUDA_ROOTS[*]} (set CUDA_HOME)" >&2
    fail=1
  else
    objs=("$OUT"/*.o)
    if g++ -shared -o "$OUT/_nvshmem_ext.so" "${objs[@]}" "$LIBDEV" \
         -L"$TORCH_LIB" -lc10 -ltorch -ltorch_cpu -ltorch_python \
         -L"$cudart_dir" -lcudart -Wl,-rpath,"$cudart_dir" \
         -L"$LIBDIR" -l:libnvshmem_host.so.3 -Wl,-rpath,"$LIBDIR"; then
      echo "  ok    link _nvshmem_ext.so"
      if "$PYTHON" - "$OUT" <<'PY'
import sys
import torch  # noqa: F401  (loads libtorch for the extension)
sys.path.insert(0, sys.argv[1])
import _nvshmem_ext as m
want = {"alltoall_put_signal", "signals_wait", "ring_step", "ring_wait", "ring_release", "quiet",
        "barrier", "get_uniqueid", "init_with_uniqueid", "symmetric_empty", "symmetric_free", "team_node",
        "team_translate_pe"}
missing = want - set(dir(m))
assert not missing, f"missing bindings: {sorted(missing)}"
assert m.MAX_PEERS == 128 and m.team_world() == 0 and m.team_node() == 2
PY
      then echo "  ok    import _nvshmem_ext (all bindings present)"
      else echo "  FAIL  import _nvshmem_ext" >&2; fail=1
      fi
    else
      echo "  FAIL  link _nvshmem_ext.so" >&2
      fail=1
    fi
  fi
fi

if (( fail )); then
  echo "check_compile: FAILED" >&2
  exit 1
fi
echo "check_compile: all ${#units[@]} translation units compiled"
