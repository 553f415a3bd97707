#!/usr/bin/env python
"""The one script to run on the first GPU box: is streamattn correct (and how fast) on real GPUs?

    python bench/gpu_check.py --json gpu_check.json   # every GPU of the box (spawns one rank per GPU)

It prints the environment first (GPUs, driver, CUDA, torch, NCCL, nvshmem4py, flash-attn, triton
and which NVSHMEM wheel fits: cu12 or cu13), then one row per check AS SOON AS IT IS MEASURED, and
rewrites the JSON (atomically) after every row: a run killed or hung half-way keeps every row so far.

Single GPU (rank 0):
  * every local kernel backend of streamattn.kernels that can run here (flash-attn if installed,
    torch-flash, torch-efficient, triton, math; cpu-flash is CPU-only) forced through
    STREAMATTN_KERNEL, fp16 / bf16 / fp32 where the backend takes that dtype, against a float64
    reference of the LSE contract: natural-log LSE in float32, GQA, causal masks with global
    offsets, odd key lengths, rows that see no key (out exactly 0, lse exactly -inf);
  * the Triton merge and pack/unpack kernels against their torch references.
Several GPUs (one rank per GPU; NCCL refuses two ranks on one GPU, so a 1-GPU box runs the checks
above only):
  * every algorithm (ulysses, ring, usp, torus, auto) on each transport (torch = NCCL, nvshmem,
    nvshmem-device = the csrc/ kernels) against the float64 reference of the whole sequence
    (uneven shards, GQA, joint text tokens, causal), max|out - ref| / max|ref| over every rank;
  * a short bench: median latency (max over ranks per call) of every algorithm on each transport.
Every case is bounded: peer waits end after --case-timeout / 2 (STREAMATTN_TIMEOUT_S, naming the
peer) and a watchdog ends the run after --case-timeout (row TIMEOUT; rows so far are kept). A
transport is not used again after its first error (later rows SKIP): after a failed exchange its
ranks' NCCL order or one-sided sequence numbers no longer agree. If NCCL itself (torch) failed, the
remaining distributed checks are skipped. At the end heaps are closed, NVSHMEM is finalised and the
process group destroyed. Exit 1 if anything FAILed or ERRORed (N/A: the library refused the
configuration with a ValueError, e.g. heads not divisible; shown with its reason, not a failure).
With no GPU visible it prints a message and exits 0: it never runs in CPU CI.

--cpu-selftest runs the same code paths on CPU (cpu-flash / math kernels, gloo, the torch, shm,
inorder and shm-device transports) so the script itself is tested without a GPU; it proves nothing
about GPUs. Options: --transports ... --algorithms ... --no-bench --bench-seq 4096 --json out.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
import traceback

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


class Results:
    """Rows printed as soon as they are added (rank 0) and the JSON rewritten atomically after each
    one, so a run that is killed or hangs keeps everything measured so far."""

    WIDTH = 46

    def __init__(self, json_path=None, echo=True):
        self.rows = []  # dicts: section, check, status, detail
        self.env = {}
        self.json_path = json_path
        self.echo = echo
        self.code = None

    def add(self, section, check, status, detail=""):
        row = {"section": section, "check": check, "status": status, "detail": detail}
        self.rows.append(row)
        self.save()  # before the print: a row on the screen is already in the JSON (kill -9 safe)
        if self.echo and len(self.rows) == 1:
            print(f"{'section':<8} {'check':<{self.WIDTH}} {'status':<6} detail", flush=True)
        if self.echo:
            print(f"{section:<8} {check:<{self.WIDTH}} {status:<6} {detail}", flush=True)

    def save(self):
        if not self.json_path:
            return
        from streamattn.files import write_private

        write_private(self.json_path, json.dumps({"code": self.code, "complete": self.code is not None,
                                                  "env": self.env, "rows": self.rows}, indent=1),
                      ".gpu_check.")

    @property
    def failed(self):
        return [r for r in self.rows if r["status"] in ("FAIL", "ERROR", "TIMEOUT")]

    def summary(self):
        counts = {s: sum(r["status"] == s for r in self.rows)
                  for s in ("PASS", "FAIL", "ERROR", "TIMEOUT", "SKIP", "N/A")}
        return f"{len(self.rows)} checks: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v)


class Watchdog:
    """Ends the process if one case runs longer than `seconds` (a hang inside a kernel or a
    collective that no timeout reaches): records a TIMEOUT row first, so the JSON keeps it."""

    def __init__(self, res, seconds):
        self.res, self.seconds = res, seconds
        self.timer = None

    def __call__(self, section, check):
        self.cancel()
        if self.seconds and self.seconds > 0:
            self.timer = threading.Timer(self.seconds, self._fire, args=(section, check))
            self.timer.daemon = True
            self.timer.start()
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.cancel()

    def cancel(self):
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _fire(self, section, check):
        try:
            self.res.code = 124
            self.res.add(section, check, "TIMEOUT", f"no result after {self.seconds:.0f}s: ending the run "
                         "(rows so far are kept)")
        finally:
            sys.stdout.flush()
            os._exit(124)


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


def _short(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ------------------------------------------------------------------------------ kernels
def reference_lse(q, k, v, scale, causal, q_offset, k_offset):
    """float64 (out, lse) of the LSE contract, written independently of streamattn.kernels."""
    import torch

    g = q.shape[1] // k.shape[1]
    qd, kd, vd = q.double(), k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = torch.matmul(qd, kd.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q.shape[2], device=q.device).unsqueeze(1) + q_offset
        j = torch.arange(k.shape[2], device=q.device).unsqueeze(0) + k_offset
        s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    dead = torch.isneginf(lse)
    p = torch.exp(s - torch.where(dead, torch.zeros_like(lse), lse).unsqueeze(-1))
    out = torch.matmul(p, vd)
    out = torch.where(dead.unsqueeze(-1), torch.zeros_like(out), out)
    return out, lse, dead


def _backend_usable(backend, device):
    from streamattn import kernels

    if device.type == "cpu":
        return backend in CPU_BACKENDS, "CPU self-test"
    if backend == "cpu-flash":
        return False, "CPU only"
    if backend == "flash-attn" and kernels.flash_attn_func() is None:
        return False, "flash-attn not installed (or built for another torch)"
    if backend == "triton":
        from streamattn import triton_kernels

        if not triton_kernels.available():
            return False, "triton not importable"
    return True, ""


def check_kernels(res, device, dtypes, backends, watch=None):
    import torch

    from streamattn import config, kernels

    with config.override(STREAMATTN_KERNEL=os.environ.get("STREAMATTN_KERNEL")):  # restored after
        gen = torch.Generator(device="cpu").manual_seed(0)
        try:
            for backend in backends:
                ok, why = _backend_usable(backend, device)
                if not ok:
                    res.add("kernel", backend, "N/A", why)
                    continue
                os.environ["STREAMATTN_KERNEL"] = backend
                kernels.select_backend.cache_clear()
                for dname in dtypes:
                    dt = getattr(torch, dname)
                    if backend in HALF_ONLY and dname == "float32":
                        res.add("kernel", f"{backend} {dname}", "N/A", "fp16/bf16 only")
                        continue
                    tol_out, tol_lse = KERNEL_TOL[dname]
                    for name, B, Hq, Hk, Sq, Sk, D, causal, qo, ko in KERNEL_CASES:
                        check = f"{backend} {dname} {name}"
                        if watch is not None:
                            watch("kernel", check)
                        try:
                            q = torch.randn(B, Hq, Sq, D, generator=gen).to(device, dt)
                            k = torch.randn(B, Hk, Sk, D, generator=gen).to(device, dt)
                            v = torch.randn(B, Hk, Sk, D, generator=gen).to(device, dt)
                            scale = D ** -0.5
                            out, lse = kernels.attention_with_lse(q, k, v, scale=scale, causal=causal,
                                                                  q_offset=qo, k_offset=ko)
                            if device.type == "cuda":
                                torch.cuda.synchronize(device)
                            ro, rl, dead = reference_lse(q, k, v, scale, causal, qo, ko)
                            problems = []
                            if tuple(out.shape) != tuple(q.shape) or out.dtype != dt:
                                problems.append(f"out {tuple(out.shape)} {out.dtype}")
                            if tuple(lse.shape) != (B, Hq, Sq) or lse.dtype != torch.float32:
                                problems.append(f"lse {tuple(lse.shape)} {lse.dtype} (want float32)")
                            live = ~dead
                            e_out = e_lse = 0.0
                            if bool(live.any()):
                                ref_live = ro[live]
                                e_out = float((out.double()[live] - ref_live).abs().max()
                                              / ref_live.abs().max().clamp_min(1e-30))
                                e_lse = float((lse.double()[live] - rl[live]).abs().max())
                            if bool(dead.any()):
                                if not bool(torch.isneginf(lse[dead]).all()):
                                    problems.append("dead rows: lse not -inf")
                                if not bool((out[dead] == 0).all()):
                                    problems.append("dead rows: out not 0")
                            if not math.isfinite(e_out) or e_out > tol_out:
                                problems.append(f"out err {e_out:.2e} > {tol_out:.0e}")
                            if not math.isfinite(e_lse) or e_lse > tol_lse:
                                problems.append(f"lse err {e_lse:.2e} > {tol_lse:.0e}")
                            detail = f"out {e_out:.1e} lse {e_lse:.1e} dead rows {int(dead.sum())}"
                            res.add("kernel", check, "FAIL" if problems else "PASS",
                                    "; ".join(problems) + (" | " if problems else "") + detail)
                        except Exception as exc:  # noqa: BLE001 - reported in the table
                            res.add("kernel", check, "ERROR", _short(exc))
        finally:
            if watch is not None:
                watch.cancel()
            kernels.select_backend.cache_clear()


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
            res.add("triton", name, "ERROR", _short(exc))

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


def check_single_rank(res, device, watch=None):
    """streamattn.attention in one process (no process group: the local path every rank of a
    group of one takes), causal and joint tokens, against the float64 reference."""
    import torch

    import streamattn
    from streamattn.reference import reference_attention

    gen = torch.Generator().manual_seed(5)
    for dname in ("float32", "bfloat16") if device.type == "cuda" else ("float32",):
        dt = getattr(torch, dname)
        for name, causal, T in (("causal", True, 0), ("joint", False, 13)):
            check = f"local {dname} {name}"
            if watch is not None:
                watch("local", check)
            try:
                q, k, v = (torch.randn(1, 203, 8, 64, generator=gen, dtype=torch.float64) for _ in range(3))
                kw = {}
                if T:
                    j = [torch.randn(1, T, 8, 64, generator=gen, dtype=torch.float64) for _ in range(3)]
                    kw = dict(joint_q=j[0], joint_k=j[1], joint_v=j[2])
                ref = reference_attention(q, k, v, causal=causal, **kw)
                ref = ref[0] if T else ref
                args = [t.to(device, dt) for t in (q, k, v)]
                out = streamattn.attention(*args, causal=causal,
                                           **{n: t.to(device, dt) for n, t in kw.items()})
                out = out[0] if T else out
                err = float((out.double().cpu() - ref).abs().max() / ref.abs().max())
                tol = DIST_TOL[dname]
                res.add("local", check, "PASS" if err <= tol else "FAIL", f"max err {err:.2e} (tol {tol:.0e})")
            except Exception as exc:  # noqa: BLE001
                res.add("local", check, "ERROR", _short(exc))
    if watch is not None:
        watch.cancel()


# ------------------------------------------------------------------------------ distributed
def _dist_cases(world, dtype):
    heads = 2 * world if world <= 12 else world
    return (
        # (name, kwargs for one call)
        ("gqa-joint-uneven", dict(seq=256 * world + 3, heads=heads, kv_heads=max(1, heads // 2),
                                  head_dim=64, joint_len=77, causal=False, dtype=dtype)),
        ("causal", dict(seq=128 * world + 1, heads=heads, kv_heads=heads, head_dim=128, joint_len=0,
                        causal=True, dtype=dtype)),
    )


def _one_dist_case(rank, world, device, algorithm, seq, heads, kv_heads, head_dim, joint_len,
                   causal, dtype, seed=0):
    """This rank's error vs the float64 reference (streamattn.testing.cases helpers, on `device`)."""
    import streamattn
    from streamattn.reference import reference_attention
    from streamattn.reference import rel_err
    from streamattn.sharding import shard, split_lengths
    from streamattn.testing.cases import make_inputs

    lens = split_lengths(seq, world)
    q, k, v, joint = make_inputs(seed=seed, batch=1, seq=seq, heads=heads, kv_heads=kv_heads,
                                 head_dim=head_dim, joint_len=joint_len, dtype=dtype)
    kw = {}
    if joint is not None:
        kw = dict(joint_q=joint[0].to(device), joint_k=joint[1].to(device), joint_v=joint[2].to(device))
        ref, jref = reference_attention(q, k, v, causal=causal, joint_q=joint[0], joint_k=joint[1],
                                        joint_v=joint[2])
    else:
        ref, jref = reference_attention(q, k, v, causal=causal), None
    ql, kl, vl = (shard(t, lens, rank).contiguous().to(device) for t in (q, k, v))
    res = streamattn.attention(ql, kl, vl, causal=causal, algorithm=algorithm, **kw)
    out, jout = res if joint is not None else (res, None)
    err = rel_err(out.cpu(), shard(ref, lens, rank))
    if jref is not None:
        err = max(err, rel_err(jout.cpu(), jref))
    from streamattn.testing.cases import last_plan

    plan = last_plan()
    return err, (plan.transport if plan is not None else "?")


def _gather(obj, group):
    """Every rank's JSON-able `obj`, in rank order (JSON over a bytes all-gather: no pickle)."""
    from streamattn.topology.comm import all_gather_bytes

    return [json.loads(b) for b in all_gather_bytes(json.dumps(obj).encode(), group=group)]


class Broken:
    """Transports that failed once: never used again in this run (see the module docstring)."""

    def __init__(self):
        self.why = {}

    def mark(self, transport, text):
        self.why.setdefault(transport, text)

    def reason(self, transport):
        if "torch" in self.why and transport != "torch":
            return f"NCCL (torch) failed earlier: {self.why['torch']}"
        return self.why.get(transport)


def _each_transport(transports):
    """Each transport name in turn with STREAMATTN_TRANSPORT set to it and a fresh plan cache (a
    plan records the transport chosen at its first call); the variable is restored after."""
    from streamattn import api, config

    with config.override(STREAMATTN_TRANSPORT=os.environ.get("STREAMATTN_TRANSPORT")):
        try:
            for transport in transports:
                os.environ["STREAMATTN_TRANSPORT"] = transport
                api.plan_cache.clear()
                yield transport
        finally:
            api.plan_cache.clear()


def check_distributed(res, rank, world, device, transports, algorithms, dtype, gloo, broken, watch=None):
    try:
        for transport in _each_transport(transports):
            for algorithm in algorithms:
                for name, kw in _dist_cases(world, dtype):
                    check = f"{transport:<7} {algorithm:<7} {name}"
                    why = broken.reason(transport)
                    if why:
                        res.add("dist", check, "SKIP", f"transport not used after its first error ({why[:120]})")
                        continue
                    if watch is not None:
                        watch("dist", check)
                    t0 = time.monotonic()
                    try:
                        mine = ("ok", _one_dist_case(rank, world, device, algorithm, **kw))
                    except ValueError as exc:
                        mine = ("na", _short(exc))
                    except Exception as exc:  # noqa: BLE001
                        mine = ("error", _short(exc))
                        if os.environ.get("STREAMATTN_GPU_CHECK_TRACE"):
                            traceback.print_exc()
                    allr = _gather(mine, gloo)
                    secs = time.monotonic() - t0
                    if all(k == "ok" for k, _ in allr):
                        err = max(v[0] for _, v in allr)
                        used = sorted({v[1] for _, v in allr})
                        tol = DIST_TOL[dtype]
                        ok = math.isfinite(err) and err <= tol and used == [transport]
                        res.add("dist", check, "PASS" if ok else "FAIL",
                                f"max err {err:.2e} (tol {tol:.0e}) {secs:.1f}s"
                                + ("" if used == [transport] else f"; plan used transport {used}"))
                    elif all(k == "na" for k, _ in allr):
                        res.add("dist", check, "N/A", allr[0][1])
                    else:
                        bad = [(r, v) for r, (k, v) in enumerate(allr) if k != "ok"]
                        text = f"rank {bad[0][0]}: {bad[0][1]}"
                        res.add("dist", check, "ERROR", text)
                        broken.mark(transport, text)
    finally:
        if watch is not None:
            watch.cancel()


def bench(res, rank, world, device, transports, algorithms, args, gloo, broken, watch=None):
    """Median latency per algorithm and transport (each call timed as the slowest rank's)."""
    import torch
    import torch.distributed as dist

    import streamattn
    from streamattn import api
    from streamattn.sharding import shard, split_lengths
    from streamattn.testing.cases import make_inputs

    dt = args.bench_dtype
    q, k, v, joint = make_inputs(seed=7, batch=1, seq=args.bench_seq, heads=args.bench_heads,
                                 kv_heads=args.bench_heads, head_dim=args.bench_dim,
                                 joint_len=args.bench_joint, dtype=dt)
    lens = split_lengths(args.bench_seq, world)
    ql, kl, vl = (shard(t, lens, rank).contiguous().to(device) for t in (q, k, v))
    kw = {}
    if joint is not None:
        kw = dict(joint_q=joint[0].to(device), joint_k=joint[1].to(device), joint_v=joint[2].to(device))
    shape = (f"seq {args.bench_seq} + joint {args.bench_joint}, {args.bench_heads} heads x "
             f"{args.bench_dim}, {dt}, {world} ranks")

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    try:
        for transport in _each_transport(transports):
            for algorithm in algorithms:
                check = f"{transport:<7} {algorithm:<7} latency"
                why = broken.reason(transport)
                if why:
                    res.add("bench", check, "SKIP", f"transport not used after its first error ({why[:120]})")
                    continue
                if watch is not None:
                    watch("bench", check)
                times, status = [], "ok"
                try:
                    for i in range(args.bench_warmup + args.bench_iters):
                        dist.barrier(group=gloo)
                        sync()
                        t0 = time.perf_counter()
                        streamattn.attention(ql, kl, vl, algorithm=algorithm, **kw)
                        sync()
                        if i >= args.bench_warmup:
                            times.append(time.perf_counter() - t0)
                except ValueError as exc:
                    status = "na:" + _short(exc)
                except Exception as exc:  # noqa: BLE001
                    status = "error:" + _short(exc)
                allr = _gather([status, times], gloo)
                bad = [s for s, _ in allr if s != "ok"]
                if bad:
                    kind = "N/A" if all(s.startswith("na:") for s in bad) else "ERROR"
                    res.add("bench", check, kind, bad[0].split(":", 1)[1])
                    if kind == "ERROR":
                        broken.mark(transport, bad[0].split(":", 1)[1])
                    continue
                per_call = [max(ts[i] for _, ts in allr) for i in range(args.bench_iters)]
                plan = str(next(reversed(api.plan_cache.values()))[1]) if api.plan_cache else ""
                res.add("bench", check, "PASS",
                        f"median {1e3 * statistics.median(per_call):.2f} ms "
                        f"(min {1e3 * min(per_call):.2f}) [{shape}] {plan[:80]}")
    finally:
        if watch is not None:
            watch.cancel()


def prebuild_extension(res, rank, gloo, broken, seconds=900.0):
    """Build (or load) the csrc/ extension before the nvshmem-device cases, so a first-time nvcc
    build is not charged to one case's timeout: rank 0 builds into the shared cache, then the others
    load it. A failure drops the nvshmem-device transport with the reason."""
    import torch.distributed as dist

    watch = Watchdog(res, seconds)
    status = "ok"
    t0 = time.monotonic()
    with watch("setup", "csrc extension build/load"):
        if rank == 0:
            try:
                _csrc_build().load_extension()
            except Exception as exc:  # noqa: BLE001
                status = _short(exc)
        status = _gather(status, gloo)[0]
        if status == "ok" and rank != 0:
            try:
                _csrc_build().load_extension()
            except Exception as exc:  # noqa: BLE001
                status = _short(exc)
        everyone = _gather(status, gloo)
    bad = [f"rank {r}: {x}" for r, x in enumerate(everyone) if x != "ok"]
    if bad:
        broken.mark("nvshmem-device", bad[0])
    res.add("setup", "csrc extension build/load", "ERROR" if bad else "PASS",
            (bad[0] if bad else f"{time.monotonic() - t0:.0f}s"))
    dist.barrier(group=gloo)


def _csrc_build():
    """csrc/build.py, installed as streamattn.csrc.build."""
    from streamattn.csrc import build

    return build


def finalise(res, rank, gloo):
    """Close every transport this process created (heaps: collective, same order on every rank),
    finalise NVSHMEM if it was initialised, destroy the process group."""
    import torch.distributed as dist

    from streamattn import api

    problems = []
    for name, t in sorted(api.transports(None).items()):
        close = getattr(t, "close", None)
        if close is None:
            continue
        try:
            close()
        except Exception as exc:  # noqa: BLE001
            problems.append(f"{name}: {_short(exc)}")
    try:
        from streamattn.transport import nvshmem as nv

        nv.finalize()
    except Exception as exc:  # noqa: BLE001
        problems.append(f"nvshmem finalize: {_short(exc)}")
    everyone = _gather(problems, gloo)
    bad = [f"rank {r}: {p}" for r, ps in enumerate(everyone) for p in ps]
    if rank == 0:
        res.add("final", "close heaps, finalise NVSHMEM", "ERROR" if bad else "PASS", "; ".join(bad)[:300])
    dist.barrier(group=gloo)
    dist.destroy_process_group()


# ------------------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    p.add_argument("--cpu-selftest", action="store_true",
                   help="run the script's code paths on CPU (tests the script, not GPUs)")
    p.add_argument("--transports", default=None,
                   help="default: torch,nvshmem,nvshmem-device (selftest: torch,shm,inorder,shm-device)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS))
    p.add_argument("--dtypes", default=None, help="kernel dtypes (default float16,bfloat16,float32)")
    p.add_argument("--dist-dtype", default=None, help="default bfloat16 (selftest float32)")
    p.add_argument("--backends", default=None, help="kernel backends (default: all that apply)")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--no-spawn", action="store_true",
                   help="do not start one rank per GPU by itself (torchrun users: implied)")
    p.add_argument("--case-timeout", type=float, default=120.0,
                   help="seconds one case may take; peer waits end after half of it (default 120)")
    p.add_argument("--bench-seq", type=int, default=4096)
    p.add_argument("--bench-joint", type=int, default=512)
    p.add_argument("--bench-heads", type=int, default=24)
    p.add_argument("--bench-dim", type=int, default=128)
    p.add_argument("--bench-dtype", default="bfloat16")
    p.add_argument("--bench-iters", type=int, default=10)
    p.add_argument("--bench-warmup", type=int, default=3)
    p.add_argument("--json", default=None, help="rows as JSON, rewritten after every row (rank 0)")
    return p.parse_args(argv)


def _spawn(argv, ngpu):
    """Re-run this script as one rank per GPU (torch.distributed.run, argument list, no shell)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ngpu}",
           os.path.abspath(__file__), "--no-spawn", *argv]
    print(f"gpu_check: {ngpu} GPUs visible: running one rank per GPU: {' '.join(cmd)}", flush=True)
    return subprocess.run(cmd).returncode


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    import torch

    selftest = args.cpu_selftest
    if not selftest and not torch.cuda.is_available():
        print("gpu_check: SKIP - no CUDA GPU visible (torch.cuda.is_available() is False); "
              "nothing checked. Run it on a GPU box.")
        return 0
    if (not selftest and "WORLD_SIZE" not in os.environ and not args.no_spawn
            and torch.cuda.device_count() > 1):
        return _spawn(argv, torch.cuda.device_count())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if selftest:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Peer waits end (naming the peer) well before the watchdog ends the whole run.
    os.environ["STREAMATTN_TIMEOUT_S"] = str(max(5.0, args.case_timeout / 2))
    res = Results(json_path=args.json if rank == 0 else None, echo=rank == 0)
    watch = Watchdog(res, args.case_timeout)
    if rank == 0:
        res.env = environment(device, world)
        print_environment(res.env)
        res.env["mode"] = "CPU self-test" if selftest else "GPU"
        check_environment(res, res.env, device)
        if not args.no_kernels:
            dtypes = (args.dtypes or ("float32" if selftest else "float16,bfloat16,float32")).split(",")
            backends = (args.backends or ",".join(CPU_BACKENDS if selftest else GPU_BACKENDS)).split(",")
            check_kernels(res, device, dtypes, backends, watch)
            if not selftest:
                check_triton_helpers(res, device, watch)
        check_single_rank(res, device, watch)
    code = 0
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("gloo" if selftest else "nccl",
                                timeout=datetime.timedelta(seconds=max(60.0, 2 * args.case_timeout)))
        gloo = dist.new_group(backend="gloo") if not selftest else dist.group.WORLD
        transports = (args.transports or ("torch,shm,inorder,shm-device" if selftest
                                          else "torch,nvshmem,nvshmem-device")).split(",")
        algorithms = args.algorithms.split(",")
        dtype = args.dist_dtype or ("float32" if selftest else "bfloat16")
        broken = Broken()
        if "nvshmem-device" in transports:
            prebuild_extension(res, rank, gloo, broken)
        check_distributed(res, rank, world, device, transports, algorithms, dtype, gloo, broken, watch)
        if not args.no_bench:
            bench(res, rank, world, device, transports, algorithms, args, gloo, broken, watch)
        with watch("final", "close heaps, finalise NVSHMEM"):
            failed = _gather(len(res.failed), gloo)
            finalise(res, rank, gloo)
        code = 1 if any(failed) or res.failed else 0
    else:
        code = 1 if res.failed else 0
        if rank == 0:
            res.add("dist", "multi-rank algorithms", "N/A",
                    "one process: the box has one GPU (NCCL needs one GPU per rank) or --no-spawn "
                    "without torchrun")
    if rank == 0:
        res.code = code
        res.save()
        print(f"gpu_check: {'FAIL' if code else 'PASS'} - {res.summary()}", flush=True)
    return code


if __name__ == "__main__":
    from streamattn.bench.exiting import exit_command

    exit_command(main())
