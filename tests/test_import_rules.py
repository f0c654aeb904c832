"""Import rules between the core library and the engine integrations, checked on the source (ast).

(a) No module of `tierkv/` outside `tierkv/cli/` imports `vllm`, `transformers` or
    `tierkv_connectors`, at any depth (inside functions too).
(b) Modules of `tierkv/cli/` import `tierkv_connectors` only inside functions (lazily), never when
    the module is imported (module top, class bodies, module-level `if`/`try` blocks).
(c) Modules of `connectors/` (installed as `tierkv_connectors`) take from tierkv only the top-level
    package's public names: `from tierkv import X` with X in `tierkv.__all__` (read from
    `tierkv/__init__.py`); never `import tierkv...` or `from tierkv.sub import ...`. Relative
    imports within connectors are fine.

Imports through `importlib.import_module("...")` / `__import__("...")` with a literal name count
as imports. Nothing here imports the modules under test. `tests/` is out of scope.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CORE = "tierkv"
CLI = "tierkv/cli"
CONNECTORS = "connectors"
ENGINES = ("vllm", "transformers", "tierkv_connectors")

RULE_A = "core-no-engines"
RULE_B = "cli-lazy-connectors"
RULE_C = "connectors-public-api"

RULE_TEXT = {
    RULE_A: "tierkv/ outside tierkv/cli/ must not import vllm, transformers or tierkv_connectors (at any depth)",
    RULE_B: "tierkv/cli/ may import tierkv_connectors only inside functions, never at module import time",
    RULE_C: "connectors/ may take from tierkv only `from tierkv import X` with X in tierkv.__all__",
}


@dataclass(frozen=True)
class Violation:
    rule: str
    path: str
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.what} -- rule {self.rule}: {RULE_TEXT[self.rule]}"


@dataclass(frozen=True)
class Import:
    """One import in a module: the absolute module name (None for a relative import), the names
    taken from it (`from m import a, b`; empty for `import m`), the line, whether it sits inside a
    function, and how it was written."""

    module: str | None
    names: tuple[str, ...]
    line: int
    in_function: bool
    text: str


def _matches(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _literal_import_call(node: ast.Call) -> str | None:
    """The module name of `importlib.import_module("m")`, `import_module("m")` or `__import__("m")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and not arg.value.startswith("."):
        return arg.value
    return None


class _Imports(ast.NodeVisitor):
    def __init__(self) -> None:
        self.found: list[Import] = []
        self._depth = 0  # enclosing functions

    def _function(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append(Import(alias.name, (), node.lineno, self._depth > 0, f"import {alias.name}"))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = tuple(alias.name for alias in node.names)
        module = node.module if node.level == 0 else None
        text = f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}"
        self.found.append(Import(module, names, node.lineno, self._depth > 0, text))

    def visit_Call(self, node: ast.Call) -> None:
        module = _literal_import_call(node)
        if module is not None:
            self.found.append(Import(module, (), node.lineno, self._depth > 0, f"{ast.unparse(node.func)}({module!r})"))
        self.generic_visit(node)


def imports_of(source: str, filename: str = "<source>") -> list[Import]:
    visitor = _Imports()
    visitor.visit(ast.parse(source, filename=filename))
    return visitor.found


def public_names(init_source: str) -> set[str]:
    """The strings in `__all__ = [...]` (and `__all__ += [...]`) of a package's `__init__.py`."""
    names: set[str] = set()
    found = False
    for node in ast.parse(init_source).body:
        targets: list[ast.expr]
        value: ast.expr | None
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets, value = [node.target], node.value
        else:
            continue
        if not any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) or value is None:
            continue
        if not isinstance(value, (ast.List, ast.Tuple)):
            raise ValueError(f"line {node.lineno}: __all__ is not a literal list or tuple")
        found = True
        for element in value.elts:
            if not (isinstance(element, ast.Constant) and isinstance(element.value, str)):
                raise ValueError(f"line {node.lineno}: __all__ holds a non-string element")
            names.add(element.value)
    if not found:
        raise ValueError("no literal __all__ found")
    return names


def check_source(source: str, path: str, public: set[str]) -> list[Violation]:
    """The rule violations of one module; `path` is relative to the repository root (posix)."""
    in_cli = path.startswith(CLI + "/")
    in_core = path.startswith(CORE + "/") and not in_cli
    in_connectors = path.startswith(CONNECTORS + "/")
    out: list[Violation] = []
    for imp in imports_of(source, path):
        if imp.module is None:  # relative: stays inside its own package
            continue
        if in_core and any(_matches(imp.module, engine) for engine in ENGINES):
            out.append(Violation(RULE_A, path, imp.line, f"`{imp.text}` imports {imp.module}"))
        if in_cli and _matches(imp.module, "tierkv_connectors") and not imp.in_function:
            out.append(Violation(RULE_B, path, imp.line, f"`{imp.text}` runs at module import time"))
        if in_connectors and _matches(imp.module, CORE):
            if imp.module != CORE:
                out.append(Violation(RULE_C, path, imp.line, f"`{imp.text}` reaches into tierkv internals ({imp.module})"))
            elif not imp.names:
                out.append(Violation(RULE_C, path, imp.line, f"`{imp.text}` imports the package, not named public names"))
            else:
                private = [name for name in imp.names if name not in public]
                if private:
                    out.append(
                        Violation(RULE_C, path, imp.line, f"`{imp.text}` takes {', '.join(private)}, not in tierkv.__all__")
                    )
    return out


def _sources(top: str) -> list[Path]:
    return sorted((ROOT / top).rglob("*.py"))


def _public() -> set[str]:
    return public_names((ROOT / CORE / "__init__.py").read_text())


def _violations(rule: str) -> list[Violation]:
    public = _public()
    out: list[Violation] = []
    for top in (CORE, CONNECTORS):
        for file in _sources(top):
            rel = file.relative_to(ROOT).as_posix()
            out += [v for v in check_source(file.read_text(), rel, public) if v.rule == rule]
    return out


def _report(violations: list[Violation]) -> str:
    return f"{len(violations)} import rule violation(s):\n" + "\n".join(f"  {v}" for v in violations)


def test_core_does_not_import_engines() -> None:
    violations = _violations(RULE_A)
    assert not violations, _report(violations)


def test_cli_imports_connectors_only_lazily() -> None:
    violations = _violations(RULE_B)
    assert not violations, _report(violations)


def test_connectors_use_only_tierkv_public_names() -> None:
    violations = _violations(RULE_C)
    assert not violations, _report(violations)


# -- the checker itself: it must see what it is meant to see, or the tests above pass vacuously --


def test_sources_are_found() -> None:
    core = [p.relative_to(ROOT).as_posix() for p in _sources(CORE)]
    connectors = [p.relative_to(ROOT).as_posix() for p in _sources(CONNECTORS)]
    assert "tierkv/store.py" in core and any(p.startswith(CLI + "/") for p in core)
    assert "connectors/__init__.py" in connectors and len(connectors) > 5
    assert {"BlockStore", "KVLayout", "StoreConfig"} <= _public()


PUBLIC = {"BlockStore", "KVLayout"}


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        # (a): at top level, nested in a function or a class, submodules, literal dynamic imports
        ("tierkv/store.py", "import vllm\n", [(RULE_A, 1)]),
        ("tierkv/ops/x.py", "import os\n\ndef f():\n    if True:\n        from transformers.cache import C\n", [(RULE_A, 5)]),
        ("tierkv/x.py", "class C:\n    import tierkv_connectors.hf as hf\n", [(RULE_A, 2)]),
        ("tierkv/x.py", "import importlib\nm = importlib.import_module('vllm.config')\n", [(RULE_A, 2)]),
        ("tierkv/x.py", "async def f():\n    __import__('transformers')\n", [(RULE_A, 2)]),
        ("tierkv/x.py", "import vllmx, transformers_extra\nfrom . import vllm\nfrom .transformers import y\n", []),
        # (b): cli may use connectors lazily, and engines at all
        ("tierkv/cli/main.py", "from tierkv_connectors.hf.demo import run_demo\n", [(RULE_B, 1)]),
        ("tierkv/cli/main.py", "try:\n    import tierkv_connectors\nexcept ImportError:\n    pass\n", [(RULE_B, 2)]),
        ("tierkv/cli/main.py", "def demo():\n    from tierkv_connectors.hf.demo import run_demo\n", []),
        ("tierkv/cli/main.py", "import vllm\nimport transformers\n", []),
        # (c): only public names of the top-level package
        ("connectors/vllm/worker.py", "from tierkv.ops.transfer import gather_engine_blocks\n", [(RULE_C, 1)]),
        ("connectors/vllm/worker.py", "def f():\n    import tierkv.residency\n", [(RULE_C, 2)]),
        ("connectors/hf/cache.py", "import tierkv\n", [(RULE_C, 1)]),
        ("connectors/hf/cache.py", "from tierkv import BlockStore, layout\n", [(RULE_C, 1)]),
        ("connectors/hf/cache.py", "from tierkv import *\n", [(RULE_C, 1)]),
        ("connectors/x.py", "from tierkv import BlockStore, KVLayout\nfrom .layout import y\nfrom . import meta\n", []),
        ("connectors/x.py", "import tierkvx\nimport vllm\n", []),
        # tests are out of scope
        ("tests/test_x.py", "import vllm\nfrom tierkv.ops.transfer import x\n", []),
    ],
)
def test_checker_reports_synthetic_violations(path: str, source: str, expected: list[tuple[str, int]]) -> None:
    found = [(v.rule, v.line) for v in check_source(source, path, PUBLIC)]
    assert found == expected


def test_violation_message_names_file_line_import_and_rule() -> None:
    (violation,) = check_source("from tierkv.layout import dtype_name\n", "connectors/vllm/connector.py", PUBLIC)
    text = str(violation)
    assert text.startswith("connectors/vllm/connector.py:1: ")
    assert "from tierkv.layout import dtype_name" in text and RULE_C in text and "tierkv.__all__" in text


def test_public_names_parse() -> None:
    assert public_names("__all__ = ['A', 'B']\n__all__ += ('C',)\n") == {"A", "B", "C"}
    with pytest.raises(ValueError):
        public_names("x = 1\n")
