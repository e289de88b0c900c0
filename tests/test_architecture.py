"""The rooms of the code and the arrows allowed between them, checked on every module's imports.

    store/    the DuckDB store: imports neither engine, ui nor selfrat
    engine/   the method: may import store, never ui or selfrat
    ui/       the app: may import engine and store, never selfrat
    selfrat/  the CLI, the composition root: may import everything

Every `import` and `from ... import` statement counts, wherever it sits (inside a function, under
TYPE_CHECKING), and so does `importlib.import_module("...")` / `__import__("...")` with a literal name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ROOMS = ("store", "engine", "ui", "selfrat")
FORBIDDEN = {
    "store": {"engine", "ui", "selfrat"},
    "engine": {"ui", "selfrat"},
    "ui": {"selfrat"},
    "selfrat": set(),
}


def _imported(tree: ast.AST, package: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a module of `package` (e.g. "engine" or "ui.views")."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package.split(".")[: max(0, len(package.split(".")) - node.level + 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.lineno, node.args[0].value))
    return out


def violations(root: Path) -> list[str]:
    """One line per wrong arrow: 'path:line: module imports name (room never imports other)'."""
    found = []
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            rel = path.relative_to(root)
            module = ".".join(rel.with_suffix("").parts)
            package = module.rsplit(".", 1)[0] if rel.name != "__init__.py" else module.removesuffix(".__init__")
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, name in _imported(tree, package):
                top = name.split(".")[0]
                if top in FORBIDDEN[room]:
                    found.append(f"{rel}:{line}: {module} imports {name} ({room} never imports {top})")
    return found


def test_the_rooms_import_only_what_they_may():
    wrong = violations(ROOT)
    assert not wrong, "wrong arrows between the rooms:\n" + "\n".join(wrong)


def test_every_room_is_checked():
    assert (ROOT / "store").is_dir() and (ROOT / "engine").is_dir() and (ROOT / "ui").is_dir()
    assert sum(1 for room in ROOMS for _ in (ROOT / room).rglob("*.py")) > 30


@pytest.mark.parametrize("room, source, culprit", [
    ("engine", "import ui\n", "engine.bad imports ui (engine never imports ui)"),
    ("engine", "def f():\n    from ui.state import store\n", "engine.bad imports ui.state"),
    ("engine", "import selfrat.cli\n", "engine never imports selfrat"),
    ("store", "from engine import metrics\n", "store.bad imports engine"),
    ("store", "import importlib\nimportlib.import_module('ui.app')\n", "store.bad imports ui.app"),
    ("ui", "from selfrat.cli import app\n", "ui never imports selfrat"),
])
def test_a_new_wrong_arrow_is_reported_with_its_module_and_line(tmp_path, room, source, culprit):
    for r in ROOMS:
        (tmp_path / r).mkdir()
        (tmp_path / r / "__init__.py").write_text("")
    (tmp_path / room / "ok.py").write_text("import store\nfrom . import ok\n")
    (tmp_path / room / "bad.py").write_text("import os\n\n" + source)
    found = violations(tmp_path)
    assert len(found) == 1 and culprit in found[0]
    assert found[0].startswith(f"{room}/bad.py:3: ") or found[0].startswith(f"{room}/bad.py:4: ")


def test_relative_imports_resolve_to_their_own_room(tmp_path):
    for r in ROOMS:
        (tmp_path / r / "sub").mkdir(parents=True)
    (tmp_path / "store" / "sub" / "m.py").write_text("from .. import db\nfrom ..sub import other\n")
    assert violations(tmp_path) == []
    assert _imported(ast.parse("from .. import x"), "engine.sub") == [(1, "engine")]
    assert _imported(ast.parse("from .y import x"), "ui.views") == [(1, "ui.views.y")]
