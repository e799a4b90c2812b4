"""Exit 0 when this Python can start the ComfyUI whose requirements.txt is given, else print what is missing.

Checks every line of ComfyUI's requirements.txt at its version specifier (the "non essential" ones too: the
server imports some of them, e.g. pydantic, at start-up, and the environment env.sh builds installs them all),
then imports the torch family, whose wheels must match each other (a mismatch fails only at import).
Used by scripts/env.sh; standard library only, since it runs before any environment exists.
"""
import importlib
import importlib.metadata as md
import re
import sys


def missing(requirements_txt: str) -> list[str]:
    problems = []
    for line in open(requirements_txt, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, spec = re.match(r"([A-Za-z0-9_.\-]+)\s*(.*)", line).groups()
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        try:
            from packaging.specifiers import SpecifierSet
        except ImportError:  # no packaging: presence is all we can check
            continue
        if spec and installed not in SpecifierSet(spec.split(";")[0].strip()):
            problems.append(f"{name}: {installed} does not satisfy {spec}")
    for module in ("torch", "torchvision", "torchaudio"):
        try:
            md.version(module)
        except md.PackageNotFoundError:
            continue  # listed ones were reported above
        try:
            importlib.import_module(module)
        except Exception as exc:  # a wheel built for another torch
            problems.append(f"{module}: import fails ({exc})")
    return problems


if __name__ == "__main__":
    found = missing(sys.argv[1])
    print("\n".join(found) or "ok")
    sys.exit(1 if found else 0)
