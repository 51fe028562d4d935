"""Layering: `common` sits below every component, and the scheduling core loads no transport.

The import checks run in a fresh interpreter (a subprocess), since the test process itself has
long since imported grpc and aiohttp; the `common` check reads the source (ast), so it also
catches imports that only run lazily or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

from common import cli

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = frozenset({"scheduler", "peer", "seed"})  # the packages above common
TRANSPORTS = frozenset({"grpc", "aiohttp"})  # what the pure scheduling core must not pull in
COMMANDS = ("scheduler", "dfdaemon", "up", "preheat")


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)


def _loaded_packages_after(statement: str) -> set[str]:
    """Top-level packages a fresh interpreter has loaded after running `statement`."""
    result = _run_python(f"{statement}\nimport sys\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}})))")
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def _imported_names(node: ast.AST) -> list[str]:
    """The modules an ast node imports: import statements, and import_module/__import__ of a literal."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.level == 0 and node.module else []
    if (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and ast.unparse(node.func) in ("__import__", "importlib.import_module", "import_module")):
        return [node.args[0].value]
    return []


def _component_imports(source: str, filename: str) -> list[str]:
    """`filename:line name` for every import of a component package in the module `source`."""
    return [f"{filename}:{node.lineno} {name}"
            for node in ast.walk(ast.parse(source, filename=filename)) if isinstance(node, ast.stmt | ast.expr)
            for name in _imported_names(node) if name.split(".")[0] in COMPONENTS]


def test_common_imports_no_component() -> None:
    modules = sorted((ROOT / "common").rglob("*.py"))
    assert modules, "no modules found under common/"
    offending = [hit for path in modules for hit in _component_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert offending == [], "common/ must not import scheduler, peer or seed:\n" + "\n".join(offending)


def test_the_import_check_sees_every_form() -> None:
    source = ("import peer.daemon\nfrom scheduler import core\nimport importlib\n"
              "def lazy():\n    importlib.import_module('seed.up')\nfrom common import ids\nimport peerless\n")
    hits = _component_imports(source, "probe.py")
    assert sorted(hits) == ["probe.py:1 peer.daemon", "probe.py:2 scheduler", "probe.py:5 seed.up"]


def test_scheduler_core_loads_no_transport() -> None:
    loaded = _loaded_packages_after("import scheduler.core")
    assert "scheduler" in loaded
    assert loaded & TRANSPORTS == set()


def test_config_loads_no_transport() -> None:
    # What the core needs of the config (TLS settings checks included) stays transport-free.
    loaded = _loaded_packages_after("import common.config, common.tls_settings")
    assert loaded & TRANSPORTS == set()


def test_every_command_is_an_installed_entry_point() -> None:
    installed = {ep.name: ep for ep in entry_points(group=cli.COMMAND_GROUP)}
    assert set(installed) == set(COMMANDS), "reinstall the package (pip install -e .) after editing pyproject.toml"
    for name in COMMANDS:
        command = installed[name].load()
        assert callable(command) and command.__name__ == "main", name


def test_help_lists_the_commands_without_loading_them() -> None:
    result = _run_python("import sys\nfrom common import cli\ncode = cli.main(['--help'])\n"
                         "print(sorted({m.split('.')[0] for m in sys.modules} & {'scheduler', 'peer', 'seed'}))\n"
                         "sys.exit(code)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: damselfly {scheduler,dfdaemon,up,preheat} [options]\n")
    for name in COMMANDS:
        assert f"\n  {name} " in result.stdout
    assert result.stdout.rstrip().endswith("[]")  # no component imported just to print help


def test_unknown_command_is_an_error_that_lists_the_commands() -> None:
    result = subprocess.run([sys.executable, "-m", "common.cli", "schedular"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.startswith("damselfly: unknown command 'schedular'\n\n"
                                    "usage: damselfly {scheduler,dfdaemon,up,preheat} [options]\n")


def test_dfget_loads_no_daemon_code_nor_the_config() -> None:
    # Every dfget is a process started for one download (sixteen at once on a node pool's scale-out):
    # what it imports is CPU taken from the daemons. The daemons' config module builds its option
    # tables at import time; dfget needs only the value parsers of common.units.
    result = _run_python("import sys, peer.dfget\nprint(' '.join(sorted(sys.modules)))")
    assert result.returncode == 0, result.stderr
    loaded = set(result.stdout.split())
    assert "common.units" in loaded
    assert loaded.isdisjoint({"common.config", "peer.daemon", "peer.download.engine", "peer.storage.store", "aiohttp",
                              "peer.output_fill"})
    # One file comes over the download socket: gRPC and asyncio (0.12 s of CPU to import) only
    # when a -r tree or a dfdaemon without that socket needs them.
    assert loaded.isdisjoint({"asyncio", "grpc", "peer.dfget_grpc"})
