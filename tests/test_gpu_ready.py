"""Small GPU-readiness facts checked on CPU (issue 16): the NVSHMEM wheel chosen from torch's
CUDA and the driver, torch < 2.10 streams wrapped for nvshmem4py, H200 in the device tables."""
import types

import pytest

from streamattn.transport import nvshmem as nv


@pytest.mark.parametrize("cuda,driver,want", [
    ("13.0", "580.65.06", "cu13"), ("13.0", "575.51.03", None), ("12.8", "570.1", "cu12"),
    ("12.4", None, "cu12"), (None, "580.1", None), ("11.8", "550.1", None)])
def test_nvshmem_flavour(cuda, driver, want):
    got, why = nv.nvshmem_flavour(cuda, driver)
    assert got == want, why
    if want:
        assert nv.NVSHMEM4PY_PINS[want] in why
    elif cuda and cuda.startswith("13"):
        assert ">= 580" in why


def test_torch_streams_without_cuda_stream_protocol_are_wrapped():
    class NvshmemStream:
        def __init__(self, s):
            self.pt_stream = s

        def __cuda_stream__(self):
            return (0, self.pt_stream.cuda_stream)

    core = types.SimpleNamespace(NvshmemStream=NvshmemStream)
    old = types.SimpleNamespace(cuda_stream=1234)  # a torch < 2.10 Stream: no __cuda_stream__
    wrapped = nv.nvshmem_stream(core, old)
    assert isinstance(wrapped, NvshmemStream) and wrapped.__cuda_stream__() == (0, 1234)

    class New:
        cuda_stream = 5

        def __cuda_stream__(self):
            return (0, 5)

    new = New()
    assert nv.nvshmem_stream(core, new) is new
    assert nv.nvshmem_stream(core, "fake-stream") == "fake-stream"


def test_h200_in_device_tables():
    from streamattn.datasheet import DEVICE_MEMORY_BW
    from streamattn.topology import gpulinks

    assert gpulinks.peak_flops_for("NVIDIA H200")[0] == 989e12
    assert gpulinks.peak_flops_for("NVIDIA H200 NVL")[0] == 835e12
    assert any(k == "H200" and bw == 4.8e12 for k, bw, _ in DEVICE_MEMORY_BW)
