"""Vendor data-sheet figures the cost model uses where nothing was measured or declared."""

# Memory bandwidth per device (bytes/s), vendor data-sheet figures; matched by substring of
# Topology.device. Used for the memory-bound local work (packing copies, LSE merges).
DEVICE_MEMORY_BW = (
    ("H200", 4.8e12, "spec:NVIDIA H200 data sheet, HBM3e 4.8 TB/s (SXM and NVL)"),
    ("H100 SXM", 3.35e12, "spec:NVIDIA H100 SXM data sheet, HBM3 3.35 TB/s"),
    ("H100 PCIE", 2.0e12, "spec:NVIDIA H100 PCIe data sheet, HBM2e 2.0 TB/s"),
    ("H100", 3.35e12, "spec:NVIDIA H100 SXM data sheet, HBM3 3.35 TB/s"),
    ("A100", 2.039e12, "spec:NVIDIA A100 80GB SXM data sheet, HBM2e 2,039 GB/s (40GB: 1,555)"),
    ("L20", 864e9, "spec:NVIDIA L20 product sheet, GDDR6 864 GB/s"),
    ("L40", 864e9, "spec:NVIDIA L40 data sheet, GDDR6 864 GB/s"),
)
