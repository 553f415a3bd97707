"""`streamattn plan` and `streamattn probe` in-process through streamattn.cli.main."""
import json

from streamattn.cli import main
from streamattn.plan import Plan


def test_plan_explain_runs(capsys):
    rc = main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128", "--joint-len", "512",
               "--topology", "h100x8-2node", "--explain"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "Candidates" in out and "dropped: 24 heads not divisible by u=16" in out
    assert "Steps of the chosen plan" in out and "Why: auto: cheapest of 24 costed candidates" in out
    # 4 ulysses/ring/usp + 6 torus splits costed, each also with the joint tokens folded in, and
    # the 4 rings / USPs again with all joint queries on every ring member;
    # torus rows show u, t and r
    assert "dropped: 24 heads not divisible by u x t = 8 x 2" in out


def test_plan_torus_forced(capsys):
    assert main(["plan", "--seq", "4096", "--heads", "32", "--head-dim", "128", "--joint-len", "256",
                 "--topology", "h100x8-2node", "--algorithm", "torus", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "Chosen: Plan(torus, ulysses=8 x torus=2 x ring=1" in out
    assert "torus exchange 1/1 q,k,v arrives, attend its block" in out
    assert main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128", "--topology",
                 "h100x8-2node", "--algorithm", "torus", "--ulysses-degree", "4", "--ring-degree", "2",
                 "--json"]) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert (plan.algorithm, plan.ulysses_degree, plan.torus_degree, plan.ring_degree) == ("torus", 4, 2, 2)
    assert main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128", "--topology",
                 "h100x8-2node", "--algorithm", "torus", "--ulysses-degree", "8"]) == 2
    assert "valid torus splits u x t x r" in capsys.readouterr().err


def test_plan_json_and_plain(capsys):
    assert main(["plan", "--seq", "32768", "--heads", "32", "--head-dim", "128", "--topology",
                 "l20x8-pcie", "--json"]) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    # the planner's pick there (tests/test_planner.py::test_l20_pcie_hybrid_beats_ulysses_8_at_32k)
    assert (plan.algorithm, plan.ulysses_degree) in (("torus", 1), ("usp", 4)), plan
    assert plan.algorithm != "torus" or plan.torus_degree == 8
    assert main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128", "--topology",
                 "h100x8-1node", "--world-size", "4", "--explain", "--json", "--dtype", "fp16"]) == 0
    full = Plan.from_json(capsys.readouterr().out)
    assert full.candidates and full.ulysses_degree * full.ring_degree == 4
    assert main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128"]) == 0
    assert capsys.readouterr().out.startswith("Plan(")


def test_plan_errors_exit_2(capsys):
    assert main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128", "--topology",
                 "h100x8-2node", "--ulysses-degree", "16"]) == 2
    assert "24 heads not divisible by u=16" in capsys.readouterr().err
    assert main(["plan", "--seq", "4096", "--heads", "24", "--head-dim", "128", "--topology",
                 "no-such-machine"]) == 2


def test_plan_on_a_spec_with_declared_rate(capsys):
    assert main(["plan", "--seq", "2048", "--heads", "8", "--head-dim", "64", "--topology",
                 "2x4:inter=1Gbit/s", "--compute-rate", "0.05", "--memory-bandwidth", "5",
                 "--seq-lens", "256,256,256,256,256,256,256,256", "--causal", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "0.05 TFLOP/s per rank (given)" in out and "causal" in out


def test_probe_single_process(capsys, tmp_path):
    assert main(["probe", "--no-measure", "--json", "--out", str(tmp_path / "p.json")]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["topology"]["world_size"] == 1 and "hostname" in d["host"]
    assert json.loads((tmp_path / "p.json").read_text()) == d
    assert main(["probe", "--topology", "l20x8-pcie", "--out", "-"]) == 0
    out = capsys.readouterr().out
    assert "pcie_cross_socket" in out and "GFLOP/s" in out
