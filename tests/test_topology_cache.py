"""Issue 11, finding 6: the on-disk topology cache is validated, never trusted blindly."""
import json
import os

import pytest

from streamattn.topology import cache, parse_spec

PROBE = "streamattn.testing.robustness_cases:probe_cached"


@pytest.fixture
def cdir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("STREAMATTN_CACHE_DIR", str(d))
    return d


def _stored(hosts=(7, 7)):
    key = cache.cache_key(hosts, len(hosts), "gloo", "cpu")
    path = cache.store(key, hosts, parse_spec("1x2"))
    return key, list(hosts), path


def _edit(path, fn):
    d = json.loads(open(path).read())
    fn(d)
    with open(path, "w") as f:
        f.write(json.dumps(d).replace('"INF"', "Infinity"))


def test_valid_file_is_used(cdir):
    key, hosts, _ = _stored()
    assert cache.load(key, hosts) is not None


@pytest.mark.parametrize("field", ["bandwidth_Bps", "latency_s"])
def test_non_finite_values_are_a_miss(cdir, field):
    key, hosts, path = _stored()
    _edit(path, lambda d: d["topology"]["intra"].__setitem__(field, "INF"))
    assert "Infinity" in open(path).read()
    assert cache.load(key, hosts) is None


def test_non_positive_bandwidth_is_a_miss(cdir):
    key, hosts, path = _stored()
    _edit(path, lambda d: d["topology"]["intra"].__setitem__("bandwidth_Bps", -5))
    assert cache.load(key, hosts) is None


def test_writable_by_others_or_symlink_is_refused(cdir, tmp_path):
    key, hosts, path = _stored()
    os.chmod(path, 0o666)
    with pytest.warns(UserWarning, match="not writable by others"):
        assert cache.load(key, hosts) is None
    os.chmod(path, 0o600)
    planted = tmp_path / "planted.json"
    os.rename(path, planted)
    os.symlink(planted, path)
    with pytest.warns(UserWarning, match="ignoring the topology cache file"):
        assert cache.load(key, hosts) is None
    os.unlink(path)
    os.rename(planted, path)
    assert cache.load(key, hosts) is not None
    os.chmod(cdir, 0o777)
    with pytest.warns(UserWarning, match="writable by others"):
        assert cache.load(key, hosts) is None
    with pytest.raises(OSError, match="writable by others"):
        cache.store(key, hosts, parse_spec("1x2"))
    os.chmod(cdir, 0o700)


def test_file_owned_by_another_user_is_refused(cdir):
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    key, hosts, path = _stored()
    os.chown(path, 65534, 65534)
    with pytest.warns(UserWarning, match="owned by uid 65534"):
        assert cache.load(key, hosts) is None


@pytest.mark.parametrize("P", [2])
def test_probe_with_bad_or_planted_cache(rank_pool, P, tmp_path):
    d = str(tmp_path / "c")
    pool = rank_pool(P)
    first = pool.run(PROBE, cache_dir=d)
    assert all(r["provenance"] == "probe" for r in first), first
    (name,) = [f for f in os.listdir(d) if f.endswith(".json")]
    path = os.path.join(d, name)
    assert pool.run(PROBE, cache_dir=d)[0]["provenance"].startswith("probe:cache")
    # Infinity: used to fail every later job (rank 0: not JSON compliant; the others a timeout)
    _edit(path, lambda t: t["topology"]["intra"].__setitem__("bandwidth_Bps", "INF"))
    res = pool.run(PROBE, cache_dir=d)
    assert all(r["provenance"] == "probe" and r["seconds"] < 15 for r in res), res
    assert "Infinity" not in open(path).read()  # re-probed and rewritten
    assert pool.run(PROBE, cache_dir=d)[0]["provenance"].startswith("probe:cache")
    # a planted node map (two nodes) for this run's hosts is not used
    _edit(path, lambda t: t["topology"].__setitem__("node", [0, 1]))
    res = pool.run(PROBE, cache_dir=d)
    assert all(r["provenance"] == "probe" and r["node"] == [0, 0] for r in res), res
