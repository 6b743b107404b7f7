"""Every shell command and Python snippet in the docs runs (tests/docs_runner.py; issue 20).

Run: `pytest tests/test_docs.py` (slow: it runs `make demo` and what the README does after it).
To cover another document, add it to DOCS and mark its blocks that need a GPU, a cluster or data
we do not have with `<!-- skip: next "reason" -->` right above them.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from docs_runner import indented_code_blocks, make_sandbox, parse

ROOT = Path(__file__).resolve().parent.parent
# One sandbox, in this order: docs/data.md writes data/digits (as a reader's first command would; a
# second write there is refused), README.md's `make demo` then trains on it and makes the run the
# README's later blocks use; the other documents use both.
FIRST = ["docs/data.md", "README.md", "slurm/README.md", "distvit/offload/README.md"]
DOCS = FIRST + sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md") if str(p.relative_to(ROOT)) not in FIRST)
EXAMPLES = [(doc, ex) for doc in DOCS for ex in parse(doc)]


@pytest.fixture(scope="module")  # one copy of the project for every document
def sandbox(tmp_path_factory):
    return make_sandbox(tmp_path_factory.mktemp("docs"))


@pytest.mark.slow
@pytest.mark.parametrize("doc,example", EXAMPLES, ids=[f"{doc}:{ex.line}" for doc, ex in EXAMPLES])
def test_doc_block_runs(sandbox, doc, example):
    example.evaluate()


def test_every_block_is_run_or_skipped_with_a_reason():
    """The collector sees the fences; a skip marker must give its reason."""
    kinds = {}
    for doc, ex in EXAMPLES:
        kinds.setdefault(doc, []).append(ex.region.evaluator.__class__.__name__)
        if isinstance(ex.parsed, tuple):  # a skip marker: (action, reason)
            assert ex.parsed[1], f"{doc}:{ex.line}: a skip marker needs its reason, e.g. skip: next \"needs 8 GPUs\""
    readme = [ex for doc, ex in EXAMPLES if doc == "README.md" and not isinstance(ex.parsed, tuple)]
    assert len(readme) >= 10  # every fence of the README is collected


def test_every_markdown_doc_is_covered():
    """A new doc (README.md, docs/, slurm/, a package's README) is in DOCS, or this names it."""
    docs = {"README.md", "slurm/README.md", *(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")),
            *(str(p.relative_to(ROOT)) for p in (ROOT / "distvit").rglob("*.md"))}
    missing = sorted(docs - set(DOCS))
    assert not missing, f"not run by the docs test: {missing}; add them to DOCS in tests/test_docs.py"


@pytest.mark.parametrize("doc", DOCS)
def test_no_command_hides_in_an_indented_block(doc):
    """An indented code block is not collected; a command there would never run."""
    lines = indented_code_blocks(doc)
    assert not lines, (f"{doc}: indented code block at line(s) {lines}: fence it as ```bash / ```python "
                       "(run by tests/test_docs.py) or ```text (not a command)")


def test_indented_block_finder_sees_one_and_ignores_lists_and_fences(tmp_path, monkeypatch):
    import docs_runner
    (tmp_path / "x.md").write_text("text\n\n    make demo\n\n* item\n\n    more of the item\n\n"
                                   "```bash\n\n    inside a fence\n```\nline\n    lazy continuation\n")
    monkeypatch.setattr(docs_runner, "ROOT", tmp_path)
    assert indented_code_blocks("x.md") == [3]
