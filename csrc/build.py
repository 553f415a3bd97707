"""Build helpers for the NVSHMEM extension in csrc/ (importable without streamattn, torch or CUDA).

- ``load_extension(verbose=False)``: the compiled module. Tries the prebuilt
  ``streamattn._nvshmem_ext`` (``STREAMATTN_BUILD_CUDA=1 pip install .``) first, else builds on
  demand: nvcc ``-rdc=true`` for exchange.cu, a device link against ``libnvshmem_device.a``, then
  ``torch.utils.cpp_extension.load`` for bindings.cpp linked with those objects and
  ``libnvshmem_host.so.3``. Cached under ``$STREAMATTN_CACHE_DIR/ext`` (default ~/.cache/streamattn;
  streamattn's one cache setting, read here from the environment: setup.py imports this file).
- ``cuda_extension()``: ``(CUDAExtension, {"build_ext": BuildExtension})`` for setup.py.
- ``find_nvshmem()``: ``(include_dir, lib_dir)`` of NVSHMEM: ``$NVSHMEM_HOME``, else the installed
  ``nvidia-nvshmem-cu13`` or ``-cu12`` wheel (a dependency of nvshmem4py-cu13 / -cu12: both install
  ``nvidia/nvshmem``; it must match torch's CUDA major), else the copy unpacked by
  ``check_compile.sh`` (headers and libnvshmem_device.a only: enough to compile, not to link).

The kernels need a CUDA GPU and an NVSHMEM bootstrap at run time; nothing here runs on CPU-only
installs, and nothing imports this file unless the nvshmem transport is chosen.
"""
import glob
import hashlib
import importlib
import os
import subprocess
import sys

CSRC = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "_nvshmem_ext"
CU_SOURCES = ("exchange.cu",)
CPP_SOURCES = ("bindings.cpp",)


def _cache_root():
    root = os.environ.get("STREAMATTN_CACHE_DIR") or os.path.join("~", ".cache", "streamattn")
    return os.path.abspath(os.path.expanduser(root))


def find_nvshmem(require_host_lib=True):
    """Return ``(include_dir, lib_dir)``; raise RuntimeError naming what is missing."""
    cands = []
    home = os.environ.get("NVSHMEM_HOME")
    if home:
        cands.append(home)
    try:
        import nvidia.nvshmem as _nv  # namespace package of the nvidia-nvshmem-cu13 wheel

        cands.extend(list(getattr(_nv, "__path__", [])))
    except Exception:
        pass
    for p in sys.path:
        cands.append(os.path.join(p, "nvidia", "nvshmem"))
    cands.extend(sorted(glob.glob(os.path.join(_cache_root(), "nvshmem-*", "nvidia", "nvshmem")), reverse=True))
    seen = []
    for c in cands:
        inc, lib = os.path.join(c, "include"), os.path.join(c, "lib")
        if c in seen or not os.path.isfile(os.path.join(inc, "nvshmem.h")):
            continue
        seen.append(c)
        if not os.path.isfile(os.path.join(lib, "libnvshmem_device.a")):
            continue
        if require_host_lib and not _host_lib(lib):
            continue
        return inc, lib
    what = "headers, libnvshmem_device.a" + (" and libnvshmem_host.so" if require_host_lib else "")
    raise RuntimeError(
        f"NVSHMEM not found (need {what}): pip install nvidia-nvshmem-cu13 (torch CUDA 13, driver "
        f">= 580) or nvidia-nvshmem-cu12 (torch CUDA 12), or set NVSHMEM_HOME; "
        f"looked in {seen or cands[:6]}"
    )


def _host_lib(lib_dir):
    for name in ("libnvshmem_host.so", "libnvshmem_host.so.3"):
        if os.path.exists(os.path.join(lib_dir, name)):
            return name
    hits = sorted(glob.glob(os.path.join(lib_dir, "libnvshmem_host.so*")))
    return os.path.basename(hits[0]) if hits else None


def _link_flags(lib_dir):
    return [f"-L{lib_dir}", f"-l:{_host_lib(lib_dir)}", f"-Wl,-rpath,{lib_dir}"]


def cuda_extension():
    """``(ext, cmdclass)`` for setup.py: bindings.cpp + exchange.cu with RDC and a device link."""
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if cpp_extension.CUDA_HOME is None:
        raise RuntimeError(
            "STREAMATTN_BUILD_CUDA=1 needs a CUDA build of torch and the CUDA toolkit (CUDA_HOME); "
            "this torch is CPU-only or nvcc was not found"
        )
    inc, lib = find_nvshmem()
    ext = CUDAExtension(
        name=f"streamattn.{EXT_NAME}",
        sources=[os.path.join(CSRC, s) for s in CPP_SOURCES + CU_SOURCES],
        include_dirs=[CSRC, inc],
        library_dirs=[lib],
        dlink=True,
        dlink_libraries=["nvshmem_device"],
        extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O2", "-rdc=true"]},
        extra_link_args=_link_flags(lib),
    )
    return ext, {"build_ext": BuildExtension.with_options(use_ninja=True)}


def _arch_flags():
    """nvcc -gencode flags: $TORCH_CUDA_ARCH_LIST (e.g. "9.0;10.0") or the visible GPUs, else sm_90."""
    archs = []
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        archs = [a.replace(".", "").replace("+PTX", "") for a in env.replace(" ", ";").split(";") if a]
    else:
        try:
            import torch

            for i in range(torch.cuda.device_count()):
                major, minor = torch.cuda.get_device_capability(i)
                archs.append(f"{major}{minor}")
        except Exception:
            pass
    archs = sorted(set(archs)) or ["90"]
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]


def _run(cmd, verbose):
    if verbose:
        print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def load_extension(verbose=False, force_jit=False):
    """The extension module (prebuilt if installed, else built on demand and cached)."""
    if not force_jit:
        try:
            return importlib.import_module(f"streamattn.{EXT_NAME}")
        except ImportError:
            pass
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, load

    if not torch.cuda.is_available():
        raise RuntimeError("the NVSHMEM extension needs a CUDA GPU (torch.cuda.is_available() is False)")
    if CUDA_HOME is None:
        raise RuntimeError("CUDA toolkit (nvcc) not found: set CUDA_HOME")
    inc, lib = find_nvshmem()
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc")
    arch = _arch_flags()
    key = hashlib.sha256()
    for s in CU_SOURCES + ("exchange.h",):
        with open(os.path.join(CSRC, s), "rb") as f:
            key.update(f.read())
    key.update(repr((arch, inc, lib, torch.__version__)).encode())
    out = os.path.join(_cache_root(), "ext", key.hexdigest()[:16])
    for d in (_cache_root(), os.path.dirname(out), out):  # owner-only, every level we create
        os.makedirs(d, mode=0o700, exist_ok=True)
    objs = []
    for s in CU_SOURCES:
        obj = os.path.join(out, os.path.splitext(s)[0] + ".o")
        if not os.path.exists(obj):
            _run([nvcc, "-c", "-O2", "-rdc=true", "-std=c++20", "-Xcompiler", "-fPIC", *arch,
                  f"-I{CSRC}", f"-I{inc}", "-o", obj + ".tmp", os.path.join(CSRC, s)], verbose)
            os.replace(obj + ".tmp", obj)
        objs.append(obj)
    dlink = os.path.join(out, "dlink.o")
    if not os.path.exists(dlink):
        _run([nvcc, "-dlink", "-Xcompiler", "-fPIC", *arch, *objs,
              os.path.join(lib, "libnvshmem_device.a"), "-o", dlink + ".tmp"], verbose)
        os.replace(dlink + ".tmp", dlink)
    return load(
        name=f"streamattn_nvshmem_ext_{key.hexdigest()[:8]}",
        sources=[os.path.join(CSRC, s) for s in CPP_SOURCES],
        extra_include_paths=[CSRC],
        extra_cflags=["-O2"],
        extra_ldflags=[*objs, dlink, os.path.join(lib, "libnvshmem_device.a"), *_link_flags(lib), "-lcudart"],
        build_directory=out,
        with_cuda=True,
        verbose=verbose,
    )


if __name__ == "__main__":  # python csrc/build.py: build (GPU box) and print what was loaded
    m = load_extension(verbose=True)
    print(m.__name__, sorted(n for n in dir(m) if not n.startswith("_")))
