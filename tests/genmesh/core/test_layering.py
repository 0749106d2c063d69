"""The bottom layer stays the bottom: ``genmesh.core`` and the generated gRPC code import
nothing from the layers above them (the services, the gateway, the CLI and its tools).

Read from the source with ``ast``, so an import inside a function (a lazy one) counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.procs import REPO_ROOT

# The bottom layer: genmesh/core, and the code protoc generates from protos/ (genmesh.v1,
# genmesh.rls, genmesh.authz; present once `make protos` ran).
BOTTOM = ("genmesh.core", "genmesh.v1", "genmesh.rls", "genmesh.authz")
# Every layer above it.
ABOVE = ("services", "gateway", "tests", "scripts", "genmesh.cli", "genmesh.commands",
         "genmesh.launcher", "genmesh.bench", "genmesh.client", "genmesh.rollout_report",
         "genmesh.protos")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO_ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path) -> str:
    """The package relative imports in ``path`` start from."""
    name = module_name(path)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def bottom_modules() -> list[Path]:
    return sorted(path for package in BOTTOM
                  for path in (REPO_ROOT / package.replace(".", "/")).rglob("*.py"))


def imported_modules(source: str, *, package: str) -> set[str]:
    """Every module ``source`` (a module of ``package``) imports, relative imports
    resolved, ``importlib.import_module("...")`` calls included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module" and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def is_within(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def is_above(module: str) -> bool:
    """Whether the bottom layer may not import ``module``: a layer above it, or any part
    of genmesh but the bottom layer itself."""
    return is_within(module, ABOVE) or (is_within(module, ("genmesh",))
                                        and not is_within(module, BOTTOM)
                                        and module != "genmesh")


def test_the_bottom_layer_imports_nothing_above_it():
    modules = bottom_modules()
    assert REPO_ROOT / "genmesh/core/deployment.py" in modules
    assert REPO_ROOT / "genmesh/core/models/store.py" in modules
    violations = {
        f"{path.relative_to(REPO_ROOT)} imports {name}"
        for path in modules
        for name in imported_modules(path.read_text(), package=package_of(path))
        if is_above(name)}
    assert not violations, "\n".join(sorted(violations))


def test_the_checker_sees_lazy_relative_and_dynamic_imports():
    source = ("def f():\n    from services.worker import records\n"
              "from .models import store\nfrom . import metadata\nfrom ..bench import mesh\n"
              "import importlib\nimportlib.import_module('gateway.envoy')\n")
    found = imported_modules(source, package="genmesh.core")
    assert {"services.worker", "services.worker.records", "genmesh.core.models.store",
            "genmesh.core.metadata", "genmesh.bench.mesh", "gateway.envoy"} <= found
    assert {name for name in found if is_above(name)} == {
        "services.worker", "services.worker.records", "genmesh.bench", "genmesh.bench.mesh",
        "gateway.envoy"}
