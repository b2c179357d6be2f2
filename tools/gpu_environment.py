"""Whether the GPU machine's Python can run the GPU command (`make gpu-check`).

That Python holds its image's packages (tools/gpu_check.py: GPU_IMAGE_PACKAGES), the carried
wheels (GPU_WHEELS) and nothing else. So every third-party module that the package (eomt/) or
the GPU command (tools/gpu_check.py, the scripts and test files it runs, tests/conftest.py and
what they import from this repository) imports must come from one of the two; a module of
neither may only be imported inside functions, by features the command never uses, and is
listed with the reason (MODULES_NOT_NEEDED_ON_GPU), or by package files that neither the
command nor the rest of the package imports (FILES_NOT_NEEDED_ON_GPU: the HTTP service).

    python -m tools.gpu_environment                         # what fails that rule (exit 1)
    python -m tools.gpu_environment --standin-requirements  # what `make gpu-standin` installs
    python -m tools.gpu_environment --check-installed       # in the stand-in: nothing more

Imports map to distributions with importlib.metadata.packages_distributions() where installed
(PIL -> pillow), else by their own name.
"""

import argparse
import ast
import functools
import importlib.metadata
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

from eomt import gpu_check as checks
from tools import gpu_check

REPO = Path(__file__).resolve().parents[1]
LOCAL_PACKAGES = ("eomt", "tools", "tests", "datasets")
# Modules of a distribution that need another one to import.
NEEDS_ANOTHER_DISTRIBUTION = {"torch.utils.tensorboard": "tensorboard"}
# Bounds on image packages whose versions the image's list does not give, read from the list:
# it has six and not tzdata, which python-dateutil 2.x requires (4.x requires tzdata instead).
STANDIN_BOUNDS = ["python-dateutil<3"]
# This repository's own distribution (its egg-info lies on the PYTHONPATH the command runs with).
OWN_DISTRIBUTION = "eomt"


@dataclass(frozen=True)
class Import:
    module: str  # as written: "PIL", "torch.nn", "tests.test_model"
    path: Path
    line: int
    module_level: bool  # runs when its file is imported (not inside a function)

    def where(self) -> str:
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"


def normalize(name: str) -> str:
    """A distribution's canonical name (PEP 503): PyYAML -> pyyaml, typing_extensions ->
    typing-extensions."""
    return re.sub(r"[-_.]+", "-", name).lower()


def imports_in(path: Path) -> list[Import]:
    """Every absolute import statement of a Python file; `from a import b` is listed as "a"
    and "a.b" (b may be a module)."""
    found = []
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def visit(node, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(a.name, path, child.lineno, module_level) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                found.append(Import(child.module, path, child.lineno, module_level))
                found.extend(
                    Import(f"{child.module}.{a.name}", path, child.lineno, module_level)
                    for a in child.names
                )
            visit(child, module_level and not isinstance(child, functions))

    visit(ast.parse(path.read_text(), str(path)), True)
    return found


def local_file(module: str, importer: Path) -> Path | None:
    """The file of this repository that `module` names, else None. A script (a file outside
    any package) also imports its neighbours: its folder is on its sys.path."""
    parts = module.split(".")
    if parts[0] in LOCAL_PACKAGES:
        base = REPO.joinpath(*parts)
    elif len(parts) == 1 and not (importer.parent / "__init__.py").is_file():
        base = importer.parent / module
    else:
        return None
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def gpu_command_files() -> list[Path]:
    """The package's files (but FILES_NOT_NEEDED_ON_GPU) and the GPU command's, with the
    repository files they import (a file not needed that one of them imports included)."""
    start = [REPO / "tools/gpu_check.py", REPO / "tests/conftest.py"]
    start += [REPO / p for p in [*checks.GPU_COMMAND_SCRIPTS, *checks.GPU_TEST_FILES]]
    start += [
        path
        for path in sorted((REPO / "eomt").rglob("*.py"))
        if path.relative_to(REPO).as_posix() not in gpu_check.FILES_NOT_NEEDED_ON_GPU
    ]
    files, queue = set(), list(start)
    while queue:
        path = queue.pop()
        if path in files:
            continue
        files.add(path)
        for found in imports_in(path):
            local = local_file(found.module, path)
            if local is not None:
                queue.append(local)
    return sorted(files)


def third_party_imports(files: list[Path]) -> dict[str, list[Import]]:
    """Top-level module -> where it is imported, for modules neither of the standard library
    nor of this repository; a module of NEEDS_ANOTHER_DISTRIBUTION counts as that one too."""
    found: dict[str, list[Import]] = {}
    for path in files:
        for imported in imports_in(path):
            top = imported.module.split(".")[0]
            if top in sys.stdlib_module_names or top == "__future__":
                continue
            if top in LOCAL_PACKAGES or local_file(imported.module, path) is not None:
                continue
            found.setdefault(top, []).append(imported)
            if imported.module in NEEDS_ANOTHER_DISTRIBUTION:
                found.setdefault(NEEDS_ANOTHER_DISTRIBUTION[imported.module], []).append(imported)
    return found


@functools.cache
def installed_modules() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions that provide it (a scan of them all)."""
    return importlib.metadata.packages_distributions()


def distributions_of(module: str) -> list[str]:
    """The installed distributions that provide a top-level module, else its own name."""
    return installed_modules().get(module) or [module]


def requirement_name(requirement: str) -> str:
    return normalize(Requirement(requirement).name)


def on_gpu() -> frozenset[str]:
    """The distributions the GPU machine's Python has: its image's and the carried ones."""
    image = {normalize(name) for name in gpu_check.GPU_IMAGE_PACKAGES}
    return frozenset(image | {requirement_name(r) for r in gpu_check.GPU_WHEELS})


def import_problems(imports: dict[str, list[Import]]) -> list[str]:
    """Why the GPU machine's Python would fail an import; [] when it would not."""
    problems = []
    for module, sites in sorted(imports.items()):
        distributions = distributions_of(module)
        if any(normalize(name) in on_gpu() for name in distributions):
            continue
        where = ", ".join(sorted({site.where() for site in sites}))
        reason = gpu_check.MODULES_NOT_NEEDED_ON_GPU.get(module)
        if reason is None:
            problems.append(
                f"{module} ({', '.join(distributions)}), imported at {where}: neither in the "
                "GPU image (GPU_IMAGE_PACKAGES) nor carried (GPU_WHEELS), nor listed as not "
                "needed there (MODULES_NOT_NEEDED_ON_GPU)"
            )
            continue
        eager = sorted({site.where() for site in sites if site.module_level})
        if eager:
            problems.append(
                f"{module} is not on the GPU machine ({reason}), so it may only be imported "
                f"inside functions, but {', '.join(eager)} import(s) it when loaded"
            )
    return problems


def requirements_of(distribution: str, python: str = gpu_check.GPU_IMAGE_PYTHON) -> list[str]:
    """What an installed distribution requires on CPython `python` (no extras), normalized."""
    environment = {"python_version": ".".join(python.split(".")[:2])}
    environment |= {"python_full_version": python, "extra": ""}
    names = []
    for text in importlib.metadata.requires(distribution) or []:
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate(environment):
            names.append(normalize(requirement.name))
    return names


def carried_requirement_problems() -> list[str]:
    """The carried wheels are installed with --no-deps: what they require must be there too
    (checked with the same versions installed here, pinned by requirements.txt)."""
    problems = []
    for requirement in gpu_check.GPU_WHEELS:
        name = Requirement(requirement).name
        missing = [r for r in requirements_of(name) if r not in on_gpu()]
        if missing:
            problems.append(f"{requirement} requires {missing}: neither in the image nor carried")
    return problems


def standin_requirements() -> list[str]:
    """The image's distributions the GPU command needs, pinned to the image's versions where
    known: those its imports name and those the carried wheels require, and STANDIN_BOUNDS.
    pip adds what they require in turn (`unexpected_distributions` then checks that against
    the image)."""
    image = {normalize(name) for name in gpu_check.GPU_IMAGE_PACKAGES}
    needed = {
        normalize(name)
        for module in third_party_imports(gpu_command_files())
        for name in distributions_of(module)
    }
    for requirement in gpu_check.GPU_WHEELS:
        needed.update(requirements_of(Requirement(requirement).name))
    # A carried wheel shadows the image's own copy (PYTHONPATH comes first): not installed.
    needed = needed & image - {requirement_name(r) for r in gpu_check.GPU_WHEELS}
    versions = {normalize(name): version for name, version in gpu_check.GPU_IMAGE_VERSIONS.items()}
    pinned = [f"{name}=={versions[name]}" if name in versions else name for name in sorted(needed)]
    return pinned + STANDIN_BOUNDS


def torch_dependencies() -> set[str]:
    """torch's requirements on this interpreter, and theirs, recursively."""
    found, queue = set(), ["torch"]
    while queue:
        name = queue.pop()
        if name in found:
            continue
        found.add(name)
        try:
            queue.extend(requirements_of(name, sys.version.split()[0]))
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement of another platform
    return found


def unexpected_distributions(installed: list[str] | None = None) -> list[str]:
    """Installed distributions that are neither in the GPU image nor carried nor torch's own
    dependencies: a stand-in holding them could pass where the GPU machine fails."""
    if installed is None:
        installed = [d.metadata["Name"] for d in importlib.metadata.distributions()]
    allowed = on_gpu() | torch_dependencies() | {OWN_DISTRIBUTION}
    return sorted({normalize(name) for name in installed} - allowed)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--standin-requirements", action="store_true")
    mode.add_argument("--check-installed", action="store_true")
    args = parser.parse_args(argv)
    if args.standin_requirements:
        print("\n".join(standin_requirements()))
        return 0
    if args.check_installed:
        problems = [
            f"{name} is installed but neither in the GPU image nor carried nor torch's"
            for name in unexpected_distributions()
        ]
    else:
        imports = third_party_imports(gpu_command_files())
        problems = import_problems(imports) + carried_requirement_problems()
    print("\n".join(problems) or "ok: the GPU machine's Python has what the GPU command needs")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
