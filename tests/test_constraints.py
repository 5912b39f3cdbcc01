"""constraints.txt keeps a set-up what CI tested: exact pins for every dependency, used by every pip install of
scripts/setup.sh, matching what this environment runs and what the README names."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from support import REPO


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and re.fullmatch(r"[\w.]+", version), f"constraints.txt: {line!r} is not an exact NAME==VERSION pin"
            assert not Version(version).local, f"constraints.txt: {line!r}: write it without the build label (+cpu)"
            found[canonicalize_name(name)] = version
    return found


def test_every_dependency_of_the_kit_is_pinned():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    names = {canonicalize_name(Requirement(r).name) for r in requirements} - {"finetune-kit"}
    missing = sorted(names - set(pins()))
    assert not missing, f"constraints.txt does not pin {missing}: add them (README 'Pinned versions')"


def test_this_environment_runs_the_pinned_versions():
    """What the suite passes on here is what constraints.txt says (scripts/setup.sh installs exactly that)."""
    moved = []
    for name, version in pins().items():
        try:
            installed = Version(metadata.version(name)).public
        except metadata.PackageNotFoundError:
            continue  # not installed here (constraints only bound what is installed)
        if installed != version:
            moved.append(f"{name} {installed} (pinned {version})")
    assert not moved, (
        f"installed versions differ from constraints.txt: {', '.join(moved)}. Reinstall with scripts/setup.sh, or, "
        "for a deliberate upgrade, change constraints.txt and the docs together (README 'Pinned versions')."
    )


def test_every_install_of_setup_sh_is_constrained():
    lines = [line for line in (REPO / "scripts" / "setup.sh").read_text().splitlines() if "pip install" in line]
    assert len(lines) >= 4
    for line in lines:
        if "--upgrade pip" not in line:
            assert '"${PIN[@]}"' in line, f"scripts/setup.sh installs without constraints.txt: {line.strip()}"
    assert "PIN=(-c constraints.txt)" in (REPO / "scripts" / "setup.sh").read_text()


def test_the_readme_names_the_pinned_versions():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("**Pinned versions.**") : readme.index("To upgrade, deliberately")]
    named = re.findall(r"([a-z][\w-]*) (\d+\.\d+\.\d+)", section)
    assert len(named) >= 6
    for name, version in named:
        assert pins()[canonicalize_name(name)] == version, f"README names {name} {version}; constraints.txt pins {pins()[canonicalize_name(name)]}"
