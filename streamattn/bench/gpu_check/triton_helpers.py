"""The Triton merge, pack/unpack and attention block kernels against their references (rank 0, GPU
only, section `triton`)."""
from __future__ import annotations

from .kernels import reference_lse
from .results import short


def check_triton_helpers(res, device, watch=None):
    import torch

    from streamattn import triton_kernels as tk

    if device.type != "cuda" or not tk.available():
        res.add("triton", "merge/pack", "N/A", "needs a GPU and triton")
        return
    gen = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=gen).to(device, dt)

    def run(name, fn):
        if watch is not None:
            watch("triton", name)
        try:
            msg = fn()
            torch.cuda.synchronize(device)
            res.add("triton", name, "FAIL" if msg else "PASS", msg or "")
        except Exception as exc:  # noqa: BLE001
            res.add("triton", name, "ERROR", short(exc))

    def merge():
        B, H, S, D = 2, 8, 300, 128
        out, lse = rnd(B, H, S, D), rnd(B, H, S)
        lse[:, :, :7] = float("-inf")
        out[:, :, :7] = 0
        for bdt in (torch.float32, torch.bfloat16, torch.float16):
            bo, bl = rnd(B, H, S, D, dt=bdt), rnd(B, H, S)
            bl[:, :, 3:11] = float("-inf")
            a_out, a_lse = tk.merge_(out.clone(), lse.clone(), bo, bl)
            r_out, r_lse = tk.merge_reference(out.clone(), lse.clone(), bo, bl)
            e = float((a_out - r_out).abs().max())
            same_inf = bool((torch.isneginf(a_lse) == torch.isneginf(r_lse)).all())
            fin = ~torch.isneginf(r_lse)
            el = float((a_lse[fin] - r_lse[fin]).abs().max())
            if e > 1e-5 or el > 1e-5 or not same_inf:
                return f"block {bdt}: out err {e:.1e}, lse err {el:.1e}, -inf rows equal {same_inf}"
        return ""

    def pack():
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            P, B, S, H, D = 4, 2, 77, 16, 64
            x = rnd(B, S, H, D, dt=dt)
            if not torch.equal(tk.pack_heads(x, P), tk.pack_heads_reference(x, P)):
                return f"pack_heads {dt}"
            y = rnd(P, B, S, H // P, D, dt=dt)
            if not torch.equal(tk.unpack_heads(y), tk.unpack_heads_reference(y)):
                return f"unpack_heads {dt}"
            lengths = [20, 19, 19, 19]
            xs = rnd(B, 5 + sum(lengths), H // P, D, dt=dt)
            if not torch.equal(tk.pack_seq(xs, lengths, seq_start=5),
                               tk.pack_seq_reference(xs, lengths, seq_start=5)):
                return f"pack_seq {dt}"
            buf = rnd(B * sum(lengths) * (H // P) * D, dt=dt)
            joint = rnd(B, 9, H // P, D, dt=dt)
            for front in (True, False):
                a = tk.unpack_seq(buf, lengths, B, H // P, D, joint=joint, joint_front=front)
                r = tk.unpack_seq_reference(buf, lengths, B, H // P, D, joint=joint, joint_front=front)
                if not torch.equal(a, r):
                    return f"unpack_seq {dt} joint_front={front}"
        return ""

    def attention_blocks():
        # Block-edge masks with forced block sizes (the interpreter tests do the same on CPU).
        q, k, v = rnd(1, 4, 129, 64, dt=torch.float16), rnd(1, 2, 130, 64, dt=torch.float16), \
            rnd(1, 2, 130, 64, dt=torch.float16)
        for bm, bn in ((16, 16), (64, 32), (128, 64)):
            o, l = tk.attention_fwd(q, k, v, causal=True, q_offset=40, k_offset=50, block_m=bm, block_n=bn)
            ro, rl, dead = reference_lse(q, k, v, 64 ** -0.5, True, 40, 50)
            live = ~dead
            e = float((o.double()[live] - ro[live]).abs().max() / ro[live].abs().max())
            if e > 5e-3 or not bool(torch.isneginf(l[dead]).all()):
                return f"blocks {bm}x{bn}: err {e:.1e}"
        return ""

    run("merge_ vs merge_reference (fp32/bf16/fp16 blocks, -inf rows)", merge)
    run("pack/unpack heads+seq vs references (bit-exact)", pack)
    run("attention_fwd block-edge causal masks", attention_blocks)
    if watch is not None:
        watch.cancel()
