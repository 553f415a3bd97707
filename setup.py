"""streamattn: topology-aware sequence-parallel attention.

`topology/` and `triton_kernels/` live at the repository root (see DESIGN.md) but install inside
the package as `streamattn.topology` and `streamattn.triton_kernels`, so no generic top-level
name collides with other distributions.
"""
import os

from setuptools import find_packages, setup

inner = [p for p in find_packages(include=["streamattn", "streamattn.*"])]
topo = ["streamattn.topology"] + ["streamattn.topology." + p for p in find_packages("topology")]
trit = ["streamattn.triton_kernels"] + [
    "streamattn.triton_kernels." + p for p in find_packages("triton_kernels")
]
bench = ["streamattn.bench"]
csrc = ["streamattn.csrc"]  # the CUDA sources and their on-demand builder (compiled only with CUDA)

package_dir = {
    "streamattn.topology": "topology",
    "streamattn.triton_kernels": "triton_kernels",
    "streamattn.bench": "bench",
    "streamattn.csrc": "csrc",
}
for p in topo[1:]:
    package_dir[p] = os.path.join("topology", *p.split(".")[2:])
for p in trit[1:]:
    package_dir[p] = os.path.join("triton_kernels", *p.split(".")[2:])

ext_modules, cmdclass = [], {}
if os.environ.get("STREAMATTN_BUILD_CUDA") == "1":
    # Optional: the NVSHMEM device-side exchange (csrc/) as streamattn._nvshmem_ext. Never required
    # on CPU installs. Needs a CUDA build of torch, nvcc and the nvidia-nvshmem-cu13 wheel (or
    # NVSHMEM_HOME); csrc/build.py is loaded by path so that csrc/ needs no package of its own.
    import importlib.util

    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.util.spec_from_file_location(
        "streamattn_csrc_build", os.path.join(_here, "csrc", "build.py"))
    _csrc_build = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_csrc_build)
    ext, cmd = _csrc_build.cuda_extension()
    ext_modules, cmdclass = [ext], cmd

setup(
    name="streamattn",
    version="0.1.0",
    description="Topology-aware sequence-parallel attention for Diffusion Transformers",
    packages=inner + topo + trit + bench + csrc,
    package_dir=package_dir,
    package_data={
        "streamattn.topology": ["machines/*.json"],
        "streamattn.csrc": ["*.cu", "*.cpp", "*.h", "*.sh", "*.md"],
    },
    python_requires=">=3.9",
    install_requires=["torch>=2.3", "numpy"],
    extras_require={
        # triton: the interpreter tests were written against 3.9 (its bf16 tl.dot is broken there).
        # test: everything `python -m pytest -q` needs on a fresh machine (the README's test command
        # installs only this extra): the bench tests draw PNGs (matplotlib), the pipeline examples
        # build tiny CLIP/T5 text encoders and tokenizers (transformers, which brings tokenizers);
        # DiffSynth's Wan path (installed --no-deps by the README's test commands) needs einops.
        "test": ["pytest>=7", "pytest-timeout", "triton==3.9.0; platform_machine=='x86_64'",
                 "diffusers>=0.42", "transformers>=4.51", "matplotlib", "rich", "tqdm", "einops"],
        # gpu = gpu-cu13. The NVSHMEM wheel must match torch's CUDA major (and CUDA 13 needs driver
        # >= 580): `python bench/gpu_check.py` prints which one this box needs.
        "gpu": ["flash-attn", "nvshmem4py-cu13==0.4.1", "nvidia-ml-py"],
        "gpu-cu13": ["flash-attn", "nvshmem4py-cu13==0.4.1", "nvidia-ml-py"],
        "gpu-cu12": ["flash-attn", "nvshmem4py-cu12==0.4.1", "nvidia-ml-py"],
        # yunchang: the baseline of `streamattn bench` (needs only torch; its flash extra is not used)
        "bench": ["matplotlib", "rich", "tqdm", "yunchang==0.6.4"],
        "diffusers": ["diffusers>=0.42"],
    },
    entry_points={"console_scripts": ["streamattn=streamattn.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
