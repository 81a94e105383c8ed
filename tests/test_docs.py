"""The docs stay true to the code: README's format table and commands."""

import re
from pathlib import Path

from lowbit.formats import FORMATS

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_format_table_matches_the_format_table():
    section = README.split("| format | kind | bits |", 1)[1].split("\n\n", 1)[0]
    rows = re.findall(r"^\| (\w+) \| (\w+) \| (\d+) \|", section, flags=re.M)
    table = {name: (kind, int(bits)) for name, kind, bits in rows}
    assert table == {f.name: (f.kind, f.bits) for f in FORMATS.values()}


def test_readme_states_the_two_commands_and_ci_runs_the_test_one():
    assert "make demo" in README and "make test" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: setup", makefile, flags=re.M) and re.search(r"^test: setup", makefile, flags=re.M)
