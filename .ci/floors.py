"""Print the lowest versions pyproject.toml declares (``name>=X`` -> ``name==X``) as pip constraints, for the extras
named on the command line. torch is left out: only the pinned CPU wheel is installable offline here (see .ci/run)."""

import re
import sys
from pathlib import Path

import tomllib

project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
requirements = list(project["dependencies"])
for extra in sys.argv[1:]:
    requirements += [r for r in project["optional-dependencies"][extra] if not r.startswith("adakd")]
floors = {}
for requirement in requirements:
    spec = requirement.split(";")[0].strip()
    match = re.fullmatch(r"([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*(?:,.*)?", spec)
    if match and match.group(1).lower() != "torch":
        floors[match.group(1).lower()] = match.group(2)
print("\n".join(f"{name}=={version}" for name, version in sorted(floors.items())))
