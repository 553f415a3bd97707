"""The README's install + test commands are what CI runs: `.ci/run` holds the same command lines
(between its README-COMMANDS markers) as the README's `ci-commands` block, in the same order."""
from __future__ import annotations

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _commands(lines):
    """Command lines without comments (a `#` outside quotes ends the command) or blank lines."""
    out = []
    for line in lines:
        cmd, quote = [], None
        for ch in line:
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            cmd.append(ch)
        cmd = " ".join("".join(cmd).split())
        if cmd:
            out.append(cmd)
    return out


def readme_ci_commands(text: str):
    m = re.search(r"<!-- ci-commands\b.*?-->\s*\n```(?:bash|sh)?\n(.*?)\n```", text, re.S)
    if not m:
        raise AssertionError("README.md has no `<!-- ci-commands -->` block followed by a ```bash block")
    return _commands(m.group(1).splitlines())


def ci_run_commands(text: str):
    m = re.search(r"^# README-COMMANDS BEGIN\n(.*?)^# README-COMMANDS END$", text, re.S | re.M)
    if not m:
        raise AssertionError(".ci/run has no README-COMMANDS BEGIN/END block")
    return _commands(m.group(1).splitlines())


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_ci_runs_exactly_the_readme_commands():
    readme, ci = readme_ci_commands(_read("README.md")), ci_run_commands(_read(".ci", "run"))
    assert readme, "the README's ci-commands block is empty"
    assert ci == readme, f".ci/run runs {ci}, the README says {readme}"
    assert any(c.startswith("pip install") for c in readme)
    assert any("pytest" in c for c in readme)


def test_readme_try_it_installs_what_the_test_block_installs():
    """The demo block's install line is the same as the test block's (one install for both)."""
    text = _read("README.md")
    first = re.search(r"## Try it.*?```bash\n(.*?)\n```", text, re.S)
    assert first, "README has no `## Try it` bash block"
    installs = [c for c in _commands(first.group(1).splitlines()) if c.startswith("pip install")]
    assert installs and installs[0] in readme_ci_commands(text)


def test_negative_control_drift_is_caught():
    readme = readme_ci_commands(_read("README.md"))
    drifted = _read(".ci", "run").replace('-e ".[test]"', '-e ".[test,bench]"')
    assert ci_run_commands(drifted) != readme
    with pytest.raises(AssertionError):
        ci_run_commands("#!/bin/bash\npip install x\n")


def test_every_import_the_tests_need_is_in_the_test_extra():
    """Packages the suite imports unconditionally (or that the bench tests need for PNGs) are named
    in pyproject.toml's [test] extra, so the README's one install line is enough on a fresh machine."""
    import tomllib

    extra = " ".join(tomllib.loads(_read("pyproject.toml"))["project"]["optional-dependencies"]["test"])
    extra = extra.lower()
    for pkg in ("pytest", "diffusers", "transformers", "matplotlib", "rich", "tqdm", "einops",
                "import-linter"):
        assert pkg in extra, f"{pkg} is not in pyproject.toml's [test] extra"
