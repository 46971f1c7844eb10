"""The documentation runs: every ```python block of README.md and docs/*.md is executed.

The blocks of one file run in order in one namespace, so later blocks use names defined by
earlier ones. Blocks that are not meant to run are fenced as ```text or ```bash.
"""

from __future__ import annotations

import re
import textwrap
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# A fence opens with ```python (possibly indented, e.g. inside a list) and closes with ``` at the same indent.
_BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)```python[ \t]*\n(?P<code>.*?)^(?P=indent)```[ \t]*$", re.DOTALL | re.MULTILINE
)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a markdown text, as (line number of the first code line, code)."""
    blocks = []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        blocks.append((line, textwrap.dedent(match.group("code"))))
    return blocks


def test_python_blocks_are_found() -> None:
    text = "intro\n```python\na = 1\n```\n```bash\nexit 1\n```\n- item\n\n  ```python\n  b = a + 1\n  ```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (11, "b = a + 1\n")]


@pytest.fixture
def isolated_rule_sets():
    """Docs register rules into the default rule set; other tests must not see them."""
    from reparam import registry

    saved = {name: rules.copy() for name, rules in registry._RULE_SETS.items()}
    yield
    registry._RULE_SETS.clear()
    registry._RULE_SETS.update(saved)


@pytest.mark.usefixtures("isolated_rule_sets")
@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path: Path) -> None:
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    assert blocks, f"{path.relative_to(ROOT)} has no ```python block"
    namespace: dict[str, object] = {"__name__": f"docs_{path.stem.replace('-', '_')}"}
    torch.manual_seed(0)
    for number, (line, code) in enumerate(blocks, start=1):
        where = f"{path.relative_to(ROOT)}, python block {number} (line {line})"
        source = "\n" * (line - 1) + code  # so that tracebacks show the markdown file's line numbers
        try:
            exec(compile(source, str(path), "exec"), namespace)
        except Exception:
            failure = traceback.format_exc()
        else:
            continue
        pytest.fail(f"{where} raised:\n{failure}", pytrace=False)


def test_every_refusal_reason_is_documented() -> None:
    """docs/kernel-algebra.md has a table row `| MEMBER | code | ...` for every `reparam.Reason`."""
    from reparam import Reason

    text = (ROOT / "docs" / "kernel-algebra.md").read_text(encoding="utf-8")
    missing = [r.name for r in Reason if f"| `{r.name}` | `{r.value}` |" not in text]
    assert not missing, f"docs/kernel-algebra.md's table of refusal reasons lacks {missing}"
