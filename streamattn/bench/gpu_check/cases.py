"""What gpu_check checks and how closely: algorithms, kernel backends, shapes, tolerances."""
from __future__ import annotations

ALGORITHMS = ("ulysses", "ring", "usp", "torus", "auto")
GPU_BACKENDS = ("flash-attn", "torch-flash", "torch-efficient", "triton", "math")
CPU_BACKENDS = ("cpu-flash", "math")
HALF_ONLY = ("flash-attn", "torch-flash")
# (out relative error, lse absolute error) by dtype name
KERNEL_TOL = {"float32": (2e-3, 1e-3), "float16": (5e-3, 1e-2), "bfloat16": (3e-2, 5e-2)}
DIST_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}

# (name, B, Hq, Hk, Sq, Sk, D, causal, q_offset, k_offset)
KERNEL_CASES = (
    ("full", 2, 8, 8, 257, 257, 64, False, 0, 0),
    ("gqa-rect", 1, 8, 2, 200, 333, 128, False, 0, 0),
    ("causal", 1, 8, 8, 256, 256, 64, True, 0, 0),
    ("gqa-causal-offset", 1, 8, 2, 128, 160, 128, True, 512, 384),
    ("causal-dead-rows", 1, 4, 4, 96, 64, 64, True, 100, 130),
    ("causal-all-dead", 1, 4, 4, 64, 64, 64, True, 0, 200),
    ("causal-odd-keys", 1, 4, 2, 77, 131, 64, True, 300, 250),  # Sk % 8 != 0: bias alignment
    ("causal-square-odd", 1, 4, 4, 99, 99, 64, True, 0, 0),     # fp32 causal, odd length
)


def dist_cases(world, dtype):
    heads = 2 * world if world <= 12 else world
    return (
        # (name, kwargs for one call)
        ("gqa-joint-uneven", dict(seq=256 * world + 3, heads=heads, kv_heads=max(1, heads // 2),
                                  head_dim=64, joint_len=77, causal=False, dtype=dtype)),
        ("causal", dict(seq=128 * world + 1, heads=heads, kv_heads=heads, head_dim=128, joint_len=0,
                        causal=True, dtype=dtype)),
    )
