"""Issue 11, findings 1 and 3: every rank takes the same path on every call, and the settings that
change what runs are agreed (a mismatch raises the same ValueError on every rank)."""
import pytest

SEQ = "streamattn.testing.agreement_cases:shape_sequence"
MISMATCH = "streamattn.testing.agreement_cases:settings_mismatch"


@pytest.mark.parametrize("P", [4])
@pytest.mark.parametrize("algorithm", ["ring", "ulysses"])
def test_local_shape_seen_before_on_one_rank_only(rank_pool, P, algorithm):
    # 64 -> 16/16/16/16; 67 -> 17/17/17/16 (rank 3's local shape is cached, the others' not);
    # then back and forth, and 1-token shards.
    seqs = [64, 67, 64, 65, 67, 4, 5, 64]
    res = rank_pool(P).run(SEQ, seqs=seqs, algorithm=algorithm, timeout=120)
    for r in res:
        assert len(r["errs"]) == len(seqs) and max(r["errs"]) < 1e-5, r


def _same_error_everywhere(res, *needles):
    assert all(r["type"] == "ValueError" for r in res), res
    assert len({r["error"] for r in res}) == 1, "every rank must raise the same message"
    for n in needles:
        assert n in res[0]["error"], res[0]["error"]
    assert max(r["seconds"] for r in res) < 8, res  # well under the 10 s timeout: no wait on a peer
    assert max(r["after_err"] for r in res) < 1e-5, res  # the group still works


@pytest.mark.parametrize("P", [3])
@pytest.mark.parametrize("transport", ["torch", "shm"])
def test_ulysses_chunks_differs_on_one_rank(rank_pool, P, transport):
    res = rank_pool(P).run(MISMATCH, name="STREAMATTN_ULYSSES_CHUNKS", value="2", on_rank=1,
                           transport=transport, heads=12, seq=30)
    _same_error_everywhere(res, "STREAMATTN_ULYSSES_CHUNKS", "rank 0: 0", "rank 1: 2")


@pytest.mark.parametrize("P", [3])
def test_shm_slot_differs_on_one_rank(rank_pool, P):
    res = rank_pool(P).run(MISMATCH, name="STREAMATTN_SHM_SLOT_MB", value="1", on_rank=2,
                           transport="shm", fresh_group=True, heads=12, seq=30)
    _same_error_everywhere(res, "STREAMATTN_SHM_SLOT_MB", "rank 2: 1")


@pytest.mark.parametrize("P", [3])
@pytest.mark.parametrize("name,value", [("STREAMATTN_KERNEL", "math"), ("STREAMATTN_TRITON", "0"),
                                        ("STREAMATTN_TRANSPORT", "shm"),
                                        ("STREAMATTN_TOPOLOGY", "3x1")])
def test_other_agreed_settings_differ(rank_pool, P, name, value):
    res = rank_pool(P).run(MISMATCH, name=name, value=value, on_rank=0, heads=12, seq=30,
                           transport=None if name == "STREAMATTN_TRANSPORT" else "torch")
    _same_error_everywhere(res, name)


@pytest.mark.parametrize("P", [3])
@pytest.mark.parametrize("name,value,needle", [
    ("STREAMATTN_TIMEOUT_S", "inf", "out of range"),
    ("STREAMATTN_TIMEOUT_S", "-1", "out of range"),
    ("STREAMATTN_ULYSSES_CHUNKS", "two", "not an integer"),
    ("STREAMATTN_SHM_SLOT_MB", "nan", "out of range"),
    ("STREAMATTN_TRANSPORT", "carrier-pigeon", "expected one of"),
    ("STREAMATTN_CPU_MALLOC", "always", "expected one of"),
])
def test_invalid_setting_on_one_rank(rank_pool, P, name, value, needle):
    res = rank_pool(P).run(MISMATCH, name=name, value=value, on_rank=1, heads=12, seq=30)
    _same_error_everywhere(res, "invalid input on rank 1", name, needle)


def test_plan_records_the_agreed_settings(rank_pool):
    """The Plan of a call holds the agreed settings it ran with (here the forced kernel), so
    plan.to_json() describes the run; a different kernel gives a different record."""
    res = rank_pool(2).run("streamattn.testing.agreement_cases:plan_settings", kernel="math")
    assert all(r["err"] < 1e-5 and r["settings"]["STREAMATTN_KERNEL"] == "math" for r in res), res
    other = rank_pool(2).run("streamattn.testing.agreement_cases:plan_settings", kernel="cpu-flash")
    assert all(r["settings"]["STREAMATTN_KERNEL"] == "cpu-flash" for r in other), other


def test_signature_fits_the_shm_board():
    """A signature longer than the board silently takes the P-1-message path: keep it short."""
    from streamattn import agreement
    from streamattn.transport.base import SMALL_WORDS

    assert agreement.ROW <= SMALL_WORDS
