"""The dependency rules of the repository layout, checked from the source text (``ast``; nothing is imported).

* the pure rooms (models, masks, losses, data) do not depend on Lightning or torchmetrics, so they can be used and
  tested without a Trainer;
* callbacks do not reach into the LightningModules (they talk to a module through hooks and its public attributes);
* library code does not depend on the data modules: only the Lightning layer (modules, demos, tools, the CLI) wires
  data to models;
* ``data_modules/`` and ``callbacks/`` are imported only through their installed names ``neurojepa_pl.data_modules``
  and ``neurojepa_pl.callbacks`` (a bare ``import data_modules`` works only from the repository root);
* the ``[tool.setuptools] packages`` list names every package folder, so that a wheel ships all of them;
* nothing in the repository points at the development workspace outside it.

Every import counts, including the lazy ones inside functions and ``importlib.import_module("...")`` calls with a
literal name.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE_ROOMS = ("neurojepa_pl/models", "neurojepa_pl/masks", "neurojepa_pl/losses", "neurojepa_pl/data")
LIGHTNING_PACKAGES = ("lightning", "pytorch_lightning", "torchmetrics")
# The Lightning layer: the only code under neurojepa_pl/ allowed to build data modules.
APPLICATION_PATHS = ("neurojepa_pl/modules", "neurojepa_pl/demos", "neurojepa_pl/cli.py", "neurojepa_pl/tools")
# Folders that install under another name (pyproject.toml [tool.setuptools.package-dir]).
REMAPPED_ROOTS = {"data_modules": "neurojepa_pl.data_modules", "callbacks": "neurojepa_pl.callbacks"}
SOURCE_ROOTS = ("neurojepa_pl", "data_modules", "callbacks", "tests", "benchmarks")
# Written in two pieces so that this file does not itself contain the names it forbids.
FORBIDDEN_NAMES = (".." + "/shared", "SPEC" + ".md")


def _python_files(*roots: str) -> list[Path]:
    files: list[Path] = []
    for root in roots:
        path = ROOT / root
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*.py")) if "__pycache__" not in p.parts)
    return files


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _dotted_package(path: Path) -> str:
    """The installed package a source file belongs to (``data_modules/x.py`` -> ``neurojepa_pl.data_modules``)."""
    parts = list(path.relative_to(ROOT).parent.parts)
    if parts and parts[0] in REMAPPED_ROOTS:
        parts = [*REMAPPED_ROOTS[parts[0]].split("."), *parts[1:]]
    return ".".join(parts)


def _literal_module_name(node: ast.expr) -> str | None:
    """The module named by ``import_module("a.b")`` or the constant prefix of ``import_module(f"a.b.{x}")``."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        head = node.values[0]
        if isinstance(head, ast.Constant) and isinstance(head.value, str):
            return head.value.rstrip(".") or None
    return None


def imported_modules(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` for every import in a file, at any depth.

    ``from a import b`` yields both ``a`` and ``a.b`` (``b`` may be a submodule); relative imports are resolved
    against the file's installed package.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _dotted_package(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else None
            if name == "import_module":
                module = _literal_module_name(node.args[0])
                if module:
                    yield node.lineno, module


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _violations(files: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    found: dict[tuple[str, int], str] = {}
    for path in files:
        for line, module in imported_modules(path):
            if any(_is_within(module, f) for f in forbidden):
                found.setdefault((_rel(path), line), module)  # `from a import b` yields a first, then a.b
    return [f"{where}:{line} imports {module}" for (where, line), module in sorted(found.items())]


def _assert_none(found: list[str], rule: str) -> None:
    assert not found, f"{rule}:\n  " + "\n  ".join(found)


def test_import_collector_sees_lazy_relative_and_dynamic_imports(tmp_path, monkeypatch):
    """The checks below are only as good as the collector: it must see imports in functions, resolve relative ones,
    and read ``import_module`` literals."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    source = tmp_path / "callbacks" / "sub" / "probe.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import os\n"
        "def f():\n"
        "    from ..ema import EMA\n"
        "    from neurojepa_pl import modules\n"
        "    importlib.import_module(f'lightning.pytorch.{name}')\n",
        encoding="utf-8",
    )
    found = set(imported_modules(source))
    assert (1, "os") in found
    assert (3, "neurojepa_pl.callbacks.ema.EMA") in found
    assert (4, "neurojepa_pl.modules") in found
    assert (5, "lightning.pytorch") in found
    assert _violations([source], ("neurojepa_pl.modules",)) == ["callbacks/sub/probe.py:4 imports neurojepa_pl.modules"]


def test_pure_rooms_do_not_import_lightning_or_torchmetrics():
    """models / masks / losses / data must be usable (and testable) without a Lightning install or Trainer."""
    files = _python_files(*PURE_ROOMS)
    assert len(files) > 10, "the pure rooms were not found; did the layout change?"
    _assert_none(_violations(files, LIGHTNING_PACKAGES), "Lightning / torchmetrics imported by a pure room")


def test_callbacks_do_not_import_the_lightning_modules():
    """Callbacks see a LightningModule through hooks and attributes, never by importing neurojepa_pl.modules."""
    files = _python_files("callbacks")
    assert files
    _assert_none(_violations(files, ("neurojepa_pl.modules",)), "callbacks importing neurojepa_pl.modules")


def test_library_code_does_not_import_the_data_modules():
    """Only the application layer (modules, demos, tools, CLI) depends on neurojepa_pl.data_modules."""
    files = [p for p in _python_files("neurojepa_pl") if not _rel(p).startswith(APPLICATION_PATHS)]
    assert any(_rel(p).startswith("neurojepa_pl/models/") for p in files)
    _assert_none(_violations(files, ("neurojepa_pl.data_modules",)), "library code importing the data modules")


def test_nothing_imports_the_top_level_folder_names():
    """``import data_modules`` / ``import callbacks`` resolve only from the repository root; the installed names are
    ``neurojepa_pl.data_modules`` and ``neurojepa_pl.callbacks`` (Python files and YAML ``class_path`` values)."""
    files = _python_files(*SOURCE_ROOTS) + sorted(ROOT.glob("*.py"))
    found = _violations(files, tuple(REMAPPED_ROOTS))
    class_path = re.compile(r"class_path\W+((?:data_modules|callbacks)\.[\w.]+)")
    configs = [
        p for root in (*SOURCE_ROOTS, "experiments") if (ROOT / root).is_dir() for p in (ROOT / root).rglob("*.yaml")
    ]
    for config in sorted(configs):
        for line_no, line in enumerate(config.read_text(encoding="utf-8").splitlines(), start=1):
            for match in class_path.finditer(line):
                found.append(f"{_rel(config)}:{line_no} names class_path {match.group(1)}")
    _assert_none(found, "top-level data_modules / callbacks imported (use the neurojepa_pl.* names)")


def test_setuptools_packages_list_every_package_folder():
    """A package folder missing from ``[tool.setuptools] packages`` is silently left out of the wheel."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the backport, when installed
        tomllib = pytest.importorskip("tomli")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    listed = config["tool"]["setuptools"]["packages"]
    expected = set()
    for root in ("neurojepa_pl", *REMAPPED_ROOTS):
        for init in (ROOT / root).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            head = REMAPPED_ROOTS.get(parts[0], parts[0])
            expected.add(".".join([head, *parts[1:]]))
    assert "neurojepa_pl.data_modules.cohorts" in expected
    assert len(listed) == len(set(listed)), f"duplicates in [tool.setuptools] packages: {sorted(listed)}"
    assert sorted(listed) == sorted(expected)


def _repository_files() -> list[Path]:
    """Tracked files plus new files not ignored by .gitignore (so a file about to be added is checked too)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode("utf-8")
    return [ROOT / name for name in sorted(set(listing.split("\0"))) if name and (ROOT / name).is_file()]


def test_no_file_names_the_development_workspace():
    """Users have only the repository: documents cite docs/method.md, never files outside it."""
    needles = [name.encode() for name in FORBIDDEN_NAMES]
    found = []
    for path in _repository_files():
        for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
            for needle in needles:
                if needle in line:
                    found.append(f"{_rel(path)}:{line_no} names {needle.decode()}")
    _assert_none(found, "files naming the development workspace")
