"""Run by the WebUI's launcher (A1111.md §1.1): installs what AstolfoMerge needs and the WebUI lacks.

Only these; never torch, numpy, gradio or safetensors (the WebUI pins its own, and our checkpoint
reader/writer needs no safetensors package). Nothing the host installed or pins may change: Forge
Neo re-checks its pins after the extension installers, and a package we moved would be reinstalled
on every launch (HOSTS.md). So:
- a package already installed (any version) is left alone;
- a missing one is installed with the host's own pin when the host's requirements file names it,
  else by bare name;
- every installed distribution is passed to pip as a constraint at its installed version, so pip
  picks a release that fits what is there or fails, and never upgrades or downgrades anything.
"""
import os
import re
import tempfile
from importlib import metadata

import launch

REQUIREMENTS = (  # (distribution name, what it is for)
    ("scipy", "Re-Basin's assignment solver"),
    ("matplotlib", "analysis pictures"),
)
HOST_REQUIREMENT_FILES = ("requirements_versions.txt", "requirements.txt")   # A1111; Forge Classic and Neo


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def host_root() -> str:
    return os.path.dirname(os.path.abspath(getattr(launch, "__file__", None) or os.getcwd()))


def host_pins() -> dict:
    """canonical name -> requirement line, from the host's requirements file(s) ($REQS_FILE first)."""
    pins = {}
    files = [os.environ.get("REQS_FILE")] + [os.path.join(host_root(), f) for f in HOST_REQUIREMENT_FILES]
    for path in files:
        if not path:
            continue
        if not os.path.isabs(path):
            path = os.path.join(host_root(), path)
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            line = line.split("#", 1)[0].strip()
            match = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)", line)
            if match and not line.startswith("-"):
                pins.setdefault(canonical(match.group(1)), line)
    return pins


def installed_constraints() -> list:
    """`name==version` of every installed distribution (what pip must leave as it is)."""
    found = {}
    for dist in metadata.distributions():
        name, version = dist.metadata["Name"], dist.version
        if name and version:
            found.setdefault(canonical(name), f"{name}=={version}")
    return sorted(found.values(), key=str.lower)


def install_missing():
    missing = [(name, why) for name, why in REQUIREMENTS if not launch.is_installed(name)]
    if not missing:
        return
    pins = host_pins()
    with tempfile.TemporaryDirectory(prefix="astolfo-merge-install-") as folder:
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as f:
            f.write("\n".join(installed_constraints()) + "\n")
        for name, why in missing:
            requirement = pins.get(canonical(name), name)
            launch.run_pip(f'install "{requirement}" -c "{constraints}"',
                           f"AstolfoMerge requirement ({why}): {requirement}")


install_missing()
