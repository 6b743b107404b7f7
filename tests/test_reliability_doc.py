"""docs/reliability.md names, for each failure mode, the test that shows what the product does: every
`file.py::test_name` (and each following `::test_name`, which is in the file named last) must be a
test function of that file, so a renamed or removed test cannot leave the page pointing at nothing."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
REF = re.compile(r"(?:(?:tests/)?(test_\w+\.py))?::(test_\w+)")


def _tests_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_the_page_names_exists():
    named, current = [], None
    for m in REF.finditer(DOC.read_text()):
        current = m.group(1) or current
        assert current, f"docs/reliability.md: ::{m.group(2)} comes before any test file is named"
        named.append((current, m.group(2)))
    assert len(named) >= 40, named  # the page names its tests (the regex still finds them)
    missing = []
    for file, name in named:
        path = ROOT / "tests" / file
        if not path.is_file() or not any(t == name or t.startswith(name) and name.endswith("_")
                                         for t in _tests_of(path)):
            missing.append(f"{file}::{name}")
    assert not missing, f"docs/reliability.md names tests that do not exist: {missing}"
