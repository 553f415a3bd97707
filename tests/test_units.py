"""Single-process checks of the pieces: the LSE merge, the kernel contract, plans, metadata."""

import pytest
import torch

import streamattn
from streamattn.kernels import attention_with_lse, select_backend
from streamattn.merge import empty_accumulator, merge_all, start_accumulator, update_out_and_lse
from streamattn.plan import Plan, torus_plan, valid_ulysses_degrees
from streamattn.planner import make_plan
from streamattn.topology import parse_spec
from streamattn.problem import Problem
from streamattn.reference import reference_attention
from streamattn.validate import check_agreement, encode


def _ref_block(q, k, v, scale, q_off=0, k_off=0, causal=False):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if causal:
        i = torch.arange(q.shape[2]).unsqueeze(1) + q_off
        j = torch.arange(k.shape[2]).unsqueeze(0) + k_off
        s = s.masked_fill(j > i, float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return p @ v, lse


@pytest.mark.parametrize("q_off,k_off", [(0, 0), (10, 0), (0, 10), (5, 12), (20, 3), (0, 40), (12, 0)])
@pytest.mark.parametrize("hk", [4, 2, 1])
def test_kernel_contract_causal_offsets(q_off, k_off, hk):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 9, 8), torch.randn(2, hk, 13, 8), torch.randn(2, hk, 13, 8)
    out, lse = attention_with_lse(q, k, v, scale=0.3, causal=True, q_offset=q_off, k_offset=k_off)
    ro, rl = _ref_block(q, k, v, 0.3, q_off, k_off, causal=True)
    assert out.shape == q.shape and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rl))
    fin = ~torch.isneginf(rl)
    assert (out.double() - ro).abs().max() < 1e-5
    if fin.any():
        assert (lse.double()[fin] - rl[fin]).abs().max() < 1e-5


@pytest.mark.parametrize("hk", [6, 2, 1])
def test_kernel_contract_gqa_noncausal(hk):
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 6, 17, 16), torch.randn(1, hk, 23, 16), torch.randn(1, hk, 23, 16)
    out, lse = attention_with_lse(q, k, v, scale=0.25)
    ro, rl = _ref_block(q, k, v, 0.25)
    assert (out.double() - ro).abs().max() < 1e-5 and (lse.double() - rl).abs().max() < 1e-5


def test_kernel_empty_blocks():
    q = torch.randn(1, 2, 5, 8)
    out, lse = attention_with_lse(q, q[:, :, :0], q[:, :, :0], scale=1.0)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_merge_equals_joint_softmax_and_handles_empty_rows():
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    full, full_lse = _ref_block(q, k, v, 0.5)
    out, lse = empty_accumulator(1, 2, 6, 8, torch.float32, "cpu")
    for a, b in ((0, 7), (7, 8), (8, 20)):
        o, l = attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], scale=0.5)
        update_out_and_lse(out, lse, o, l)
    assert (out.double() - full).abs().max() < 1e-6 and (lse.double() - full_lse).abs().max() < 1e-6
    # an all-empty partial leaves the result unchanged; two empty rows stay empty, without NaN
    before = out.clone()
    update_out_and_lse(out, lse, torch.zeros_like(out), torch.full_like(lse, float("-inf")))
    assert torch.equal(out, before)
    eo, el = empty_accumulator(1, 2, 6, 8, torch.float32, "cpu")
    update_out_and_lse(eo, el, torch.zeros_like(eo), torch.full_like(el, float("-inf")))
    assert (eo == 0).all() and torch.isneginf(el).all()
    # merge order does not matter beyond rounding
    parts = [attention_with_lse(q, k[:, :, a:b], v[:, :, a:b], scale=0.5) for a, b in ((0, 5), (5, 20))]
    o1, _ = merge_all(parts)
    o2, _ = merge_all(parts[::-1])
    assert (o1 - o2).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_first_partial_starts_the_accumulator_bit_identically(dtype):
    """start_accumulator(o, l) (what the ring does with its first block) equals merging (o, l)
    into an empty accumulator, bit for bit, including rows that saw no key; a different first
    partial does not (negative control)."""
    torch.manual_seed(3)
    o = torch.randn(1, 3, 7, 8, dtype=dtype).transpose(1, 2).contiguous().transpose(1, 2)  # kernel layout
    l = torch.randn(1, 3, 7, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    o[:, :, 2] = 0
    l[:, :, 2] = float("-inf")
    eo, el = empty_accumulator(1, 3, 7, 8, dtype, "cpu")
    update_out_and_lse(eo, el, o, l)
    so, sl = start_accumulator(o.clone(), l.clone())
    assert so.dtype == eo.dtype and sl.dtype == el.dtype
    assert torch.equal(so, eo) and torch.equal(sl, el)
    wrong, _ = start_accumulator(o * 1.001, l)
    assert not torch.equal(wrong, eo)


def test_kernel_backend_selection_is_explicit(monkeypatch):
    assert select_backend("cpu", torch.float32, False) == "cpu-flash"
    monkeypatch.setenv("STREAMATTN_KERNEL", "nonsense")
    select_backend.cache_clear()
    with pytest.raises(ValueError, match="STREAMATTN_KERNEL"):
        select_backend("cpu", torch.float32, False)
    monkeypatch.setenv("STREAMATTN_KERNEL", "math")
    select_backend.cache_clear()
    q = torch.randn(1, 2, 5, 8)
    out, lse = attention_with_lse(q, q, q, scale=0.3, causal=True, q_offset=3, k_offset=1)
    ro, rl = _ref_block(q, q, q, 0.3, 3, 1, causal=True)
    assert (out.double() - ro).abs().max() < 1e-5
    monkeypatch.delenv("STREAMATTN_KERNEL")
    select_backend.cache_clear()


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-2)])
def test_single_process_without_distributed(layout, dtype, tol):
    """group=None without init_process_group is a group of one: the local kernel."""
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 33, 8, 16).to(dtype), torch.randn(2, 33, 2, 16).to(dtype), torch.randn(2, 33, 2, 16).to(dtype)
    jq, jk, jv = torch.randn(2, 5, 8, 16).to(dtype), torch.randn(2, 5, 2, 16).to(dtype), torch.randn(2, 5, 2, 16).to(dtype)
    ref, jref = reference_attention(q, k, v, joint_q=jq, joint_k=jk, joint_v=jv, joint_strategy="rear")
    t = (lambda x: x.transpose(1, 2).contiguous()) if layout == "bhsd" else (lambda x: x)
    out, jout = streamattn.attention(t(q), t(k), t(v), layout=layout, joint_q=t(jq), joint_k=t(jk),
                                     joint_v=t(jv), joint_strategy="rear")
    out, jout = t(out), t(jout)
    assert out.dtype == dtype and out.shape == q.shape
    assert (out.double() - ref).abs().max() / ref.abs().max() < tol
    assert (jout.double() - jref).abs().max() / jref.abs().max() < tol


def _problem(world, heads=24, causal=False):
    return Problem(batch=1, heads=heads, kv_heads=heads, head_dim=64, dtype=torch.float32,
                   seq_lens=(4096,) * world, scale=0.125, causal=causal)


def test_plan_rules_and_errors():
    topo8 = parse_spec("2x4")
    assert valid_ulysses_degrees(16, 24) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="valid degrees for 24 heads on 16 ranks: 1, 2, 4, 8"):
        make_plan(_problem(16), parse_spec("2x8"), algorithm="ulysses", compute_rate=1e12)
    with pytest.raises(ValueError, match="does not divide the group size 6"):
        make_plan(_problem(6), parse_spec("1x6"), algorithm="usp", ulysses_degree=4, compute_rate=1e12)
    with pytest.raises(ValueError, match="!= group size"):
        make_plan(_problem(6), parse_spec("1x6"), algorithm="usp", ulysses_degree=2, ring_degree=2,
                  compute_rate=1e12)
    p = make_plan(_problem(6), parse_spec("1x6"), algorithm="usp", ring_degree=3, compute_rate=1e12)
    assert (p.ulysses_degree, p.ring_degree) == (2, 3)
    p = make_plan(_problem(8), topo8, compute_rate=1e12)
    assert p.algorithm in ("ulysses", "ring", "usp", "torus") and p.predicted_s > 0
    assert 24 % p.ulysses_degree == 0
    t = torus_plan(_problem(8), topo8)
    assert (t.algorithm, t.ulysses_degree, t.torus_degree, t.ring_degree) == ("torus", 4, 2, 1)
    with pytest.raises(ValueError, match="not divisible by ulysses_degree x torus_degree"):
        torus_plan(_problem(8, heads=12), topo8)


def test_plan_is_data():
    p = Plan("usp", 2, 2, groups=((0, 2), (1, 3)), predicted_s=0.5, reason="test")
    assert Plan.from_json(p.to_json()) == p
    assert p.ring_group(0) == [0, 1] and p.ulysses_group(3) == [1, 3] and p.ring_group(3) == [2, 3]
    q = Plan("usp", 2, 3)
    assert q.ulysses_group(3) == [2, 3] and q.ring_group(3) == [1, 3, 5]
    assert "ulysses=2 x ring=3" in str(q)


def test_metadata_round_trip_and_disagreement():
    q, k = torch.zeros(1, 5, 8, 16), torch.zeros(1, 5, 2, 16)
    a = encode(None, q, k, "bshd", False, 0.25, 0, "front", "auto", None, None)
    b = encode(None, torch.zeros(1, 7, 8, 16), k[:, :1].expand(1, 7, 2, 16), "bshd", False, 0.25, 0,
               "front", "auto", None, None)
    agreed = check_agreement([a, b])
    assert agreed["seq_lens"] == (5, 7) and agreed["heads"] == 8 and agreed["scale"] == 0.25
    c = encode(None, q, k, "bshd", False, 0.5, 0, "front", "auto", None, None)
    with pytest.raises(ValueError, match=r"disagree on scale \(rank 0: 0.25, rank 1: 0.5\)"):
        check_agreement([a, c])
    e = encode("q must be 4-D", None, None, "bshd", False, None, 0, "front", "auto", None, None)
    with pytest.raises(ValueError, match="invalid input on rank 1: q must be 4-D"):
        check_agreement([a, e])


def test_plan_records_the_settings_it_ran_with():
    """The agreed settings travel in the Plan and its JSON (negative control: a plan from
    make_plan, which ran nothing, records none and writes no "settings" key)."""
    p = Plan("ring", 1, 4, settings=(("STREAMATTN_KERNEL", "math"), ("STREAMATTN_TRITON", "0")))
    q = Plan.from_json(p.to_json())
    assert q.settings == p.settings and '"settings"' in p.to_json()
    assert '"settings"' not in Plan("ring", 1, 4).to_json()


@pytest.mark.parametrize("causal,strategy", [(False, None), (True, None), (False, "front"), (False, "rear")])
def test_reference_rows_equal_a_row_by_row_oracle(causal, strategy):
    """reference_attention (whole sequence, and rows=(a, b): one rank's shard) against attention
    written row by row from its definition, with GQA and joint tokens in front or behind."""
    g = torch.Generator().manual_seed(5)
    B, S, T, H, Hk, D = 2, 11, 3, 4, 2, 8
    q, k, v = torch.randn(B, S, H, D, generator=g), *(torch.randn(B, S, Hk, D, generator=g) for _ in "kv")
    joint = [torch.randn(B, T, h, D, generator=g) for h in (H, Hk, Hk)] if strategy else None
    if joint:
        front = strategy == "front"
        cq, ck, cv = (torch.cat([j, x] if front else [x, j], 1).double() for j, x in zip(joint, (q, k, v)))
    else:
        cq, ck, cv = q.double(), k.double(), v.double()
    want = torch.zeros_like(cq)
    for b in range(B):
        for h in range(H):
            for i in range(cq.shape[1]):
                n = i + 1 if causal else ck.shape[1]
                w = torch.softmax(ck[b, :n, h // (H // Hk)] @ cq[b, i, h] / D ** 0.5, 0)
                want[b, i, h] = w @ cv[b, :n, h // (H // Hk)]
    img, txt = (want[:, T:], want[:, :T]) if strategy == "front" else (want[:, :S], want[:, S:])
    kw = dict(joint_q=joint[0], joint_k=joint[1], joint_v=joint[2], joint_strategy=strategy) if joint else {}
    for rows in (None, (4, 9), (0, 1), (10, 11)):
        got = reference_attention(q, k, v, causal=causal, rows=rows, **kw)
        out, jout = got if joint else (got, None)
        a, b = rows or (0, S)
        assert (out - img[:, a:b]).abs().max() < 1e-12
        if joint:
            assert (jout - txt).abs().max() < 1e-12
