"""Dependency groups per role: each package imports only what its role's install provides."""

import ast
import functools
import importlib.metadata
import re
import sys
from pathlib import Path

import pytest
import tomllib

pytestmark = pytest.mark.timeout(60)


ROOT = Path(__file__).resolve().parents[2]


PACKAGES = ("protocol", "supervisor", "learner", "worker", "policy", "runreport", "fleet")


# Which extras each package's role installs on top of the base dependencies, and which
# of the project's own packages it may import (supervisor, learner and worker never import each other).
ROLES = {
    "protocol": ((), {"protocol"}),
    # `supervisor report` is runreport; `up --engine ray` places fleet's agents
    "supervisor": (("supervisor", "fleet"), {"protocol", "supervisor", "runreport", "fleet"}),
    "fleet": (("supervisor", "fleet"), {"protocol", "supervisor", "fleet"}),  # a host's agent runs its supervisor
    "learner": (("learner",), {"protocol", "learner", "policy"}),
    "worker": (("worker",), {"protocol", "worker", "policy"}),
    "policy": (("learner", "worker"), {"policy"}),  # both roles install what the shared network needs
    "runreport": ((), {"protocol", "runreport"}),  # reading a run: the base install
}


# Import names that are optional at run time (imported inside try/except ImportError, or only for one backend).
OPTIONAL = {"worker": {"highway_env", "carla"}}


@functools.lru_cache(maxsize=1)
def distributions():
    return importlib.metadata.packages_distributions()  # a scan of every installed distribution: once


def requirement_names(reqs):
    return {re.split(r"[=<>\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}


def imports_of(package):
    """Top-level names of every import in a package, lazy ones inside functions included."""
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"__future__"}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_what_its_role_installs(package):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras, own = ROLES[package]
    allowed = requirement_names(project["dependencies"])
    for extra in extras:
        allowed |= requirement_names(project["optional-dependencies"][extra])
    dists = distributions()
    for name in sorted(imports_of(package) - OPTIONAL.get(package, set())):
        if name in PACKAGES:
            assert name in own, f"{package} imports {name}: the roles share only protocol (and policy)"
            continue
        provided = {d.lower().replace("_", "-") for d in dists.get(name, [name])}
        assert provided & allowed, f"{package} imports {name} ({provided}), which its role's install lacks"


def test_every_package_is_packaged():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = {".".join(init.parent.relative_to(ROOT).parts)
               for top in PACKAGES for init in (ROOT / top).rglob("__init__.py")}
    assert set(packages) == on_disk, "every package and subpackage of the product is in the wheel"
