"""The house rules, checked on the source (``docs/architecture.md`` states them):

* no import cycle between hfhooks modules — imports inside functions and under ``if TYPE_CHECKING:`` count too
  (hiding a cycle in a function is still a cycle); a package ``__init__`` importing its own submodules is not one;
* no private name (``_x``, not a dunder) imported from another module — promote it or move the code;
* no function over :data:`MAX_FUNCTION_LINES` lines (docstring excluded) unless :data:`LONG_FUNCTIONS` says why;
* every folder has an ``__init__.py`` docstring and every module a docstring;
* ``docs/architecture.md`` names every module, so the page cannot silently fall behind the code;
* every hook hfhooks installs goes through :class:`hfhooks.core.hooks.HookSet` (one lifecycle, one census).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import hfhooks

ROOT = Path(hfhooks.__file__).parent
DOCS = ROOT.parent / "docs" / "architecture.md"
MAX_FUNCTION_LINES = 80
# "module:qualname" -> why it may stay long. Keep this short: a long function is a list of named steps waiting.
LONG_FUNCTIONS: dict[str, str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    """Every module's hfhooks imports (anywhere in the file), and every cross-module private import."""
    files = _files()
    edges: dict[str, set[str]] = {m: set() for m in files}
    private: list[str] = []
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = [(_resolve(mod, is_pkg, node), a.name) for a in node.names]
            else:
                continue
            for src, name in targets:
                if not src.startswith("hfhooks"):
                    continue
                if name and f"{src}.{name}" in files:  # `from pkg import module`
                    target = f"{src}.{name}"
                elif src in files:
                    target = src
                    if name and name.startswith("_") and not name.startswith("__") and src != mod:
                        private.append(f"{mod} imports {name} from {src}")
                else:
                    continue
                # a package's __init__ re-exporting its own submodules is how packages work, not a cycle
                if not (is_pkg and target.startswith(mod + ".")):
                    edges[mod].add(target)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    # Tarjan's strongly connected components; any component of 2+ modules (or a self-loop) is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _functions(tree: ast.AST, prefix: str = ""):
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield f"{prefix}{node.name}", node
            yield from _functions(node, f"{prefix}{node.name}.")
        elif isinstance(node, ast.ClassDef):
            yield from _functions(node, f"{prefix}{node.name}.")
        else:
            yield from _functions(node, prefix)


def _length(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    n = fn.end_lineno - fn.lineno + 1
    first = fn.body[0]
    if (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    ):
        n -= first.end_lineno - first.lineno + 1
    return n


def test_cycle_detector_sees_function_level_imports():
    # the checks below must be able to fail: a cycle hidden in a function is found, an __init__ is exempt
    edges = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert _cycles(edges) == [["a", "b"]]
    mod = ast.parse("def f():\n    from hfhooks.core import params\n")
    node = next(n for n in ast.walk(mod) if isinstance(n, ast.ImportFrom))
    assert _resolve("hfhooks.core.layers", False, node) == "hfhooks.core"
    rel = ast.parse("from ..io import paths\n").body[0]
    assert _resolve("hfhooks.core.layers", False, rel) == "hfhooks.io"
    assert _resolve("hfhooks.core", True, rel) == "hfhooks.io"


def test_no_import_cycles():
    cycles = _cycles(_graph()[0])
    assert not cycles, "import cycles between hfhooks modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_cross_module_imports():
    private = _graph()[1]
    assert not private, "private names imported across modules (promote or move them):\n" + "\n".join(private)


def test_no_private_attribute_of_another_module():
    # `from hfhooks.io import paths; paths._x` is the same leak as `from hfhooks.io.paths import _x`
    bad = []
    files = _files()
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                src = _resolve(mod, path.name == "__init__.py", node)
                for a in node.names:
                    if f"{src}.{a.name}" in files:
                        aliases[a.asname or a.name] = f"{src}.{a.name}"
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in files and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{mod}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_functions_are_short():
    long = []
    for mod, path in _files().items():
        for qualname, fn in _functions(ast.parse(path.read_text(), str(path))):
            n = _length(fn)
            if n > MAX_FUNCTION_LINES and f"{mod}:{qualname}" not in LONG_FUNCTIONS:
                long.append(f"{mod}:{qualname} ({n} lines)")
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps):\n" + "\n".join(long)
    )
    stale = [k for k in LONG_FUNCTIONS if k.split(":")[0] not in _files()]
    assert not stale, f"LONG_FUNCTIONS names modules that no longer exist: {stale}"


def test_every_module_and_folder_has_a_docstring():
    missing = [
        str(p.relative_to(ROOT.parent))
        for p in _files().values()
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, "modules without a docstring:\n" + "\n".join(missing)
    folders = [d for d in ROOT.rglob("*") if d.is_dir() and d.name != "__pycache__" and any(d.glob("*.py"))]
    no_init = [str(d.relative_to(ROOT.parent)) for d in folders if not (d / "__init__.py").exists()]
    assert not no_init, f"folders without an __init__.py: {no_init}"


def test_architecture_page_names_every_module():
    text = DOCS.read_text()
    missing = []
    for mod, path in _files().items():
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py":
            rel = rel[: -len("__init__.py")]  # a folder is named as `core/`
        if not re.search(rf"(?<![\w/.]){re.escape(rel)}(?![\w])", text) and f"`{mod}`" not in text:
            missing.append(rel)
    assert not missing, (
        f"{DOCS.name} does not mention these modules (describe them or remove them):\n" + "\n".join(missing)
    )


HOOK_CALL = re.compile(
    r"\.register_(forward_pre_hook|forward_hook|full_backward_hook|backward_hook|hook|"
    r"post_accumulate_grad_hook|step_pre_hook|step_post_hook|load_state_dict_post_hook)\("
)


@pytest.mark.parametrize("path", sorted(ROOT.rglob("*.py")), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_hooks_go_through_hookset(path):
    # one lifecycle (attach, detach, context manager) and one census: core/hooks.py is the only caller
    if path == ROOT / "core" / "hooks.py":
        return
    lines = [
        f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if HOOK_CALL.search(line) and not line.lstrip().startswith("#")
    ]
    assert not lines, "hooks registered outside HookSet (use hfhooks.core.hooks.HookSet):\n" + "\n".join(
        lines
    )


# Which folder may import which (docs/architecture.md, "Which folder may import which"). Top-level modules
# (`_version`, `__init__`, `__main__`) are not folders; `cli` may be a module or a package.
METHODS = {"freeze", "routing", "unlearning", "attribution", "restoration", "diffs", "merging"}
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "io": {"core"},
    "masks": {"core", "io"},
    "diffs": {"core", "io", "masks"},
    "trainer": {"core", "io", "masks"},
    "freeze": {"core", "masks", "trainer"},
    "attribution": {"core", "trainer"},
    "unlearning": {"core", "masks", "freeze", "trainer"},
    "routing": {"core", "io", "masks", "freeze", "trainer"},
    "restoration": {"core", "io", "masks", "diffs", "freeze", "trainer"},
    "merging": {"core", "io", "masks", "diffs"},
    "cli": {"core", "io", "masks", *METHODS},
}


def _folder(mod: str) -> str | None:
    parts = mod.split(".")
    if len(parts) < 2 or parts[1] in ("_version", "__main__"):
        return None
    return parts[1]


def _is_callback(mod: str) -> bool:
    return mod.rsplit(".", 1)[-1].endswith("callback")


def test_folder_layers():
    bad = []
    for mod, targets in _graph()[0].items():
        src = _folder(mod)
        if src is None:
            continue
        assert src in MAY_IMPORT, f"folder {src!r} is not in MAY_IMPORT (and docs/architecture.md): add it"
        for target in targets:
            dst = _folder(target)
            if dst is None or dst == src:
                continue
            if dst not in MAY_IMPORT[src]:
                bad.append(f"{mod} imports {target} ({src}/ may import {sorted(MAY_IMPORT[src])})")
            elif dst == "trainer" and not (_is_callback(mod) or src == "trainer"):
                bad.append(
                    f"{mod} imports {target}: only callbacks use trainer/ (the mechanisms run without a Trainer)"
                )
    assert not bad, "\n".join(bad)


def test_adapters_stay_at_the_edge():
    bad = []
    for mod, targets in _graph()[0].items():
        for target in targets:
            if _is_callback(target) and mod != "hfhooks":
                bad.append(f"{mod} imports the callback module {target}")
            if _folder(target) == "cli" and _folder(mod) != "cli" and mod != "hfhooks.__main__":
                bad.append(f"{mod} imports the CLI ({target})")
    for mod, path in _files().items():
        if re.search(r"import[^\n]*\bTrainerCallback\b", path.read_text()) and not _is_callback(mod):
            bad.append(f"{mod} imports transformers.TrainerCallback: only */callback.py modules may")
    assert not bad, "\n".join(bad)
