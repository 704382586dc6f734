"""Only the backend kinds know their names: nothing else compares a preset's kind to one.

Each kind answers what differs (its reserved routes, its health route, its served names)
through :class:`swapd.backends.BackendKind`; a branch on ``backend == "vllm"`` elsewhere is
knowledge a new kind would have to be added to by hand.
"""

from __future__ import annotations

import ast
from pathlib import Path

from swapd.backends import KINDS

SWAPD = Path(__file__).resolve().parent.parent / "swapd"
# Comparisons with a kind's name that are not about a preset's kind, each with why.
NOT_A_KIND = {
    # The llama-swap importer reads a foreign command line: the program it runs.
    ("llama_swap/command.py", "program == 'vllm'"),
}


def _comparisons_with_a_kind_name(path: Path) -> list[tuple[int, str]]:
    names = set(KINDS)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        if any(isinstance(s, ast.Constant) and s.value in names for s in sides):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_no_module_outside_the_backends_compares_a_kind_by_name() -> None:
    """The kinds' own modules may; any other comparison with a kind's name is listed."""
    found = []
    for path in sorted(SWAPD.rglob("*.py")):
        rel = path.relative_to(SWAPD).as_posix()
        if rel.startswith("backends/"):
            continue
        for line, text in _comparisons_with_a_kind_name(path):
            if (rel, text) not in NOT_A_KIND:
                found.append(f"swapd/{rel}:{line}: {text}")
    assert found == []


def test_the_check_finds_a_comparison_with_a_kind_name(tmp_path: Path) -> None:
    """The test above can fail: a branch on a kind's name is found."""
    module = tmp_path / "m.py"
    module.write_text('def f(preset):\n    return preset.backend != "command"\n')
    assert _comparisons_with_a_kind_name(module) == [(2, "preset.backend != 'command'")]
