"""The settings registry (streamattn/config.py): every STREAMATTN_* variable the source mentions is
declared, the README's settings table lists exactly the registry, and values are validated."""
import glob
import os
import re

import pytest

from streamattn import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = re.compile(r"STREAMATTN_[A-Z0-9_]*[A-Z0-9]")


def source_files():
    pats = ["streamattn/**/*.py", "csrc/*.py", "csrc/*.sh", "tests/*.py", "setup.py", ".ci/*"]
    for pat in pats:
        yield from glob.glob(os.path.join(ROOT, pat), recursive=True)


def undeclared(files, registry):
    found = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            for name in NAME.findall(f.read()):
                if name not in registry:
                    found.setdefault(name, os.path.relpath(path, ROOT))
    return found


def test_every_variable_in_the_source_is_declared():
    assert undeclared(source_files(), config.SETTINGS) == {}


def test_an_undeclared_read_fails(tmp_path):
    # negative control: a source file reading an undeclared variable is caught
    name = "STREAMATTN_" + "NOT_DECLARED"  # spelled in two parts so this file does not read it
    bad = tmp_path / "bad.py"
    bad.write_text(f'import os\nos.environ.get("{name}", "1")\n')
    assert undeclared([str(bad)], config.SETTINGS) == {name: str(os.path.relpath(bad, ROOT))}


def readme_table():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `(STREAMATTN_[A-Z0-9_]+)`", section, re.M)]


def test_readme_lists_exactly_the_registry():
    rows = readme_table()
    assert len(rows) == len(set(rows)), "a variable is listed twice"
    assert set(rows) == set(config.SETTINGS), (set(rows) ^ set(config.SETTINGS))


def test_readme_rows_show_default_and_range():
    from streamattn.commands.settings import table_rows

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    for row in table_rows():
        assert row in text, f"README row out of date (streamattn settings --markdown): {row}"


@pytest.mark.parametrize("name,value,needle", [
    ("STREAMATTN_TIMEOUT_S", "inf", "out of range"), ("STREAMATTN_TIMEOUT_S", "nan", "out of range"),
    ("STREAMATTN_TIMEOUT_S", "0", "out of range"), ("STREAMATTN_TIMEOUT_S", "soon", "not a number"),
    ("STREAMATTN_ULYSSES_CHUNKS", "-1", "out of range"), ("STREAMATTN_ULYSSES_CHUNKS", "1.5", "integer"),
    ("STREAMATTN_SHM_SLOT_MB", "-4", "out of range"), ("STREAMATTN_KERNEL", "fast", "expected one of"),
    ("STREAMATTN_TRITON", "yes", "expected one of"), ("STREAMATTN_PROBE_BYTES", "0", "out of range"),
    ("STREAMATTN_VALIDATE", "always", "expected one of"),
])
def test_invalid_values_raise_naming_the_variable(monkeypatch, name, value, needle):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=needle) as info:
        config.get(name)
    assert name in str(info.value) and "valid" in str(info.value) or "expected" in str(info.value)


def test_defaults_and_types(monkeypatch):
    for name in config.SETTINGS:
        monkeypatch.delenv(name, raising=False)
    assert config.timeout_s() == 300.0 and config.ulysses_chunks() == 0
    assert config.transport() == "auto" and config.kernel() == "" and config.triton() == ""
    assert config.shm_slot_bytes() == 4 << 20 and config.probe_timeout_s() == 60.0
    monkeypatch.setenv("STREAMATTN_TIMEOUT_S", "7")
    assert config.probe_timeout_s() == 7.0
    monkeypatch.setenv("STREAMATTN_TIMEOUT_S", "inf")
    assert config.wait_timeout_s() == 300.0  # the transports wait; the call reports the value
