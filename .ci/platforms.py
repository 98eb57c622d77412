"""Every platform README names can install cnnflow from wheels: each direct dependency, and each
dependency with compiled code, has a wheel for every (platform, Python) pair. Asks the package index
(`pip install --dry-run --only-binary=:all: --platform ...`, a second or two each, no download), so it
runs in .ci/run, not in the offline test suite.

    python .ci/platforms.py          # prints a table; exit code 1 if any wheel is missing
"""

from __future__ import annotations

import concurrent.futures
import importlib.metadata
import re
import subprocess
import sys
import tempfile

# pip takes the platform tags literally: a Linux machine of glibc 2.28 installs any of these
PLATFORMS = {"Linux x86_64": ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
                              "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux2010_x86_64",
                              "manylinux1_x86_64"],
             "macOS Apple silicon": ["macosx_12_0_arm64", "macosx_11_0_arm64"]}
PYTHONS = ("3.11", "3.12")  # pyproject.toml requires-python: Prefect 3.9 needs 3.11


def _name(requirement: str) -> str:
    return re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0]


def direct_requirements() -> list[str]:
    """cnnflow's own dependencies, read from the installed package's metadata (pyproject.toml would
    need tomllib, which Python 3.10 lacks), without extras and platform-only ones."""
    return [r for r in importlib.metadata.requires("cnnflow") or [] if "sys_platform" not in r and "extra ==" not in r]


def compiled_dependencies() -> list[str]:
    """Installed distributions that cnnflow needs (directly or not) and that ship compiled code, by
    name: another Python may get another release of them (numpy 2.4 has no build for 3.10, 2.2 has),
    what matters is that pip finds one with a wheel."""
    seen, queue, compiled = set(), ["cnnflow"], []
    while queue:
        name = queue.pop().lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        queue += [_name(r) for r in dist.requires or [] if "extra ==" not in r]
        wheel = dist.read_text("WHEEL") or ""
        if name != "cnnflow" and "Tag:" in wheel and "none-any" not in wheel:
            compiled.append(name)
    return sorted(compiled)


def has_wheel(requirement: str, platforms: list[str], python: str) -> bool:
    tags = [option for platform in platforms for option in ("--platform", platform)]
    with tempfile.TemporaryDirectory() as target:
        answer = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet",
                                 "--only-binary=:all:", *tags, "--python-version", python, "--target", target,
                                 requirement], capture_output=True, text=True, timeout=120)
    return answer.returncode == 0


def main() -> int:
    direct = direct_requirements()
    requirements = direct + [name for name in compiled_dependencies() if name not in {_name(r) for r in direct}]
    pairs = [(label, python) for label in PLATFORMS for python in PYTHONS]
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        answers = {(r, p): pool.submit(has_wheel, r, PLATFORMS[p[0]], p[1]) for r in requirements for p in pairs}
    missing = [(r, p) for (r, p), answer in answers.items() if not answer.result()]
    width = max(len(r) for r in requirements)
    print(f"{'requirement':<{width}}  " + "  ".join(f"{label} {python}" for label, python in pairs))
    for requirement in requirements:
        marks = ["missing" if (requirement, p) in missing else "ok" for p in pairs]
        print(f"{requirement:<{width}}  " + "  ".join(f"{m:<{len(p[0]) + len(p[1]) + 1}}" for m, p in zip(marks, pairs)))
    print(f"{len(requirements)} requirements x {len(pairs)} platforms: "
          f"{'all have wheels' if not missing else f'{len(missing)} without a wheel'}")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
