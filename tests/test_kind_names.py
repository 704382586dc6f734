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


def _names_a_kind(node: ast.expr) -> bool:
    """A kind's name, or a tuple, list or set of constants holding one."""
    if isinstance(node, ast.Constant):
        return node.value in KINDS
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        return any(_names_a_kind(item) for item in node.elts)
    return False


def _comparisons_with_a_kind_name(path: Path) -> list[tuple[int, str]]:
    """Comparisons (``==``, ``in``), ``match`` cases and dict keys naming a kind."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare) and any(
            _names_a_kind(side) for side in [node.left, *node.comparators]
        ):
            found.append((node.lineno, ast.unparse(node)))
        elif isinstance(node, ast.MatchValue) and _names_a_kind(node.value):
            found.append((node.lineno, f"case {ast.unparse(node.value)}"))
        elif isinstance(node, ast.Dict) and any(
            k is not None and _names_a_kind(k) for k in node.keys
        ):
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
    """The test above can fail: a branch, a case or a table on a kind's name is found."""
    module = tmp_path / "m.py"
    module.write_text(
        "def f(preset):\n"
        '    if preset.backend in ("vllm", "x"):\n'
        "        return 1\n"
        "    match preset.backend:\n"
        '        case "command":\n'
        "            return 2\n"
        '    return {"llama-server": 3}.get(preset.backend)\n'
    )
    assert [line for line, _ in _comparisons_with_a_kind_name(module)] == [2, 5, 7]
