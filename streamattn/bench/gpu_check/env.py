"""What the box runs (printed first, stored in the JSON) and the row for its NVSHMEM wheel."""
from __future__ import annotations

import sys


def environment(device, world):
    """What the box runs: printed first and stored in the JSON."""
    import torch

    env = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "world": world,
           "python": sys.version.split()[0]}
    try:
        import streamattn

        env["streamattn"] = getattr(streamattn, "__version__", "?")
    except Exception as exc:  # noqa: BLE001
        env["streamattn"] = f"import failed: {exc}"
    from importlib import metadata

    for dist_name in ("nvshmem4py-cu13", "nvshmem4py-cu12", "nvidia-nvshmem-cu13",
                      "nvidia-nvshmem-cu12", "flash-attn", "flash_attn", "triton", "cuda-core"):
        try:
            env[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    from streamattn.transport import nvshmem as nv

    env["driver"] = nv.driver_version()
    flavour, why = nv.nvshmem_flavour()
    env["nvshmem_wheel_needed"] = flavour
    env["nvshmem_wheel_reason"] = why
    env["nvshmem_wheel_installed"] = nv.installed_flavour()
    if device.type == "cuda":
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001
            pass
    return env


def print_environment(env):
    print("gpu_check environment:", flush=True)
    for k, v in env.items():
        print(f"  {k:<24} {v}", flush=True)


def check_environment(res, env, device):
    """Rows for what would make the first GPU run fail before any kernel: the NVSHMEM wheel."""
    if device.type != "cuda":
        res.add("env", "nvshmem wheel (cu12/cu13)", "N/A",
                f"CPU self-test; this box would need: {env['nvshmem_wheel_reason']}")
        return
    need, have = env["nvshmem_wheel_needed"], env["nvshmem_wheel_installed"]
    if need is None:
        res.add("env", "nvshmem wheel (cu12/cu13)", "FAIL", env["nvshmem_wheel_reason"])
    elif have is None:
        res.add("env", "nvshmem wheel (cu12/cu13)", "N/A", f"none installed; {env['nvshmem_wheel_reason']}")
    elif have != need:
        res.add("env", "nvshmem wheel (cu12/cu13)", "FAIL",
                f"nvshmem4py-{have} installed but {env['nvshmem_wheel_reason']}")
    else:
        res.add("env", "nvshmem wheel (cu12/cu13)", "PASS", env["nvshmem_wheel_reason"])
