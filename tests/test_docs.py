"""Every shell command and Python snippet in the docs runs (tests/docs_runner.py; issue 20).

Run: `pytest tests/test_docs.py` (slow: it runs `make demo` and what the README does after it).
To cover another document, add it to DOCS and mark its blocks that need a GPU, a cluster or data
we do not have with `<!-- skip: next "reason" -->` right above them.
"""
from __future__ import annotations

import pytest

from docs_runner import make_sandbox, parse

DOCS = ["README.md", "slurm/README.md"]
EXAMPLES = [(doc, ex) for doc in DOCS for ex in parse(doc)]


@pytest.fixture(scope="module")
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
