"""The examples in docs/integrations.md run (on the tiny checkpoint instead of kalm-mini) and rank."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


def examples() -> dict[str, str]:
    """The first python block of each ``## <Framework>`` section."""
    text = DOC.read_text(encoding="utf-8")
    found = {}
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        block = re.search(r"```python\n(.*?)```", section, flags=re.S)
        if block:
            found[title] = block.group(1)
    return found


def test_every_framework_has_an_example():
    assert set(examples()) == {"LangChain", "LlamaIndex", "Haystack"}


@pytest.mark.parametrize("framework", ["LangChain", "LlamaIndex", "Haystack"])
def test_example_runs(framework, kalm_checkpoint, capsys):
    code = examples()[framework]
    assert code.count('model="kalm-mini"') == 2  # the encoder and the reranker name the same model
    code = code.replace('model="kalm-mini"', f"model={str(kalm_checkpoint)!r}")
    exec(compile(code, f"docs/integrations.md ({framework})", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2  # top 2 of the 3 documents
