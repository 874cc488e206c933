"""Which installed distributions differ from a lock: run it with the interpreter to inspect.

    python .ci/drift.py LOCK            # print the differences (bash .ci/run --latest: drift),
                                        # then the locked packages not installed here, in one line
    python .ci/drift.py LOCK --exact    # exit 1 if anything installed is not as the lock pins it
                                        # (bash .ci/run: the lock in use)

A difference is an installed package at another version than the lock's, or not in the lock. A
locked package that is not installed is not one by itself: an extra left out, or a dependency of
another platform's build.

Standard library only, so it runs in any venv.
"""
from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

# The installer and the project itself are in every venv and in no lock.
NOT_LOCKED = frozenset({"pip", "mixer-toolkit"})


def canonical(name: str) -> str:
    """PEP 503's normalised name: ``Foo_Bar.baz`` -> ``foo-bar-baz``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> dict[str, str]:
    """``name==version`` lines of a pip requirements file, comments and markers ignored."""
    pins = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: not a name==version pin: {line!r}")
        pins[canonical(name.strip())] = version.strip()
    return pins


def installed() -> dict[str, str]:
    """Every distribution this interpreter sees, by canonical name."""
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def matches(locked: str | None, version: str | None) -> bool:
    """PEP 440's ``==``: a pin without a build label (``2.13.0``) is met by any build of that
    version (``2.13.0+cpu``); a pin with one only by that build."""
    if locked is None or version is None:
        return locked == version
    return version == locked or ("+" not in locked and version.split("+", 1)[0] == locked)


def differences(lock: dict[str, str], have: dict[str, str], installed_only: bool = False
                ) -> list[tuple[str, str | None, str | None]]:
    """(name, locked version or None, installed version or None) for each package that differs;
    ``installed_only``: only installed ones (not installed is not a difference)."""
    names = sorted(((set() if installed_only else set(lock)) | set(have)) - NOT_LOCKED)
    return [(n, lock.get(n), have.get(n)) for n in names if not matches(lock.get(n), have.get(n))]


def report(lock_name: str, rows: list[tuple[str, str | None, str | None]]) -> str:
    if not rows:
        return f"drift: none, every package is as {lock_name} pins it"
    width = max(len(n) for n, _, _ in rows)
    lines = [f"drift: {len(rows)} package(s) differ from {lock_name} (locked -> installed):"]
    lines += [f"  {n:<{width}}  {a or '(not locked)'} -> {b or '(not installed)'}" for n, a, b in rows]
    return "\n".join(lines)


def not_installed(lock: dict[str, str], have: dict[str, str], shown: int = 8) -> str | None:
    """One line naming the locked packages this interpreter lacks: not drift by themselves (the
    dependencies of another platform's build, such as PyPI torch's CUDA libraries where a CPU
    build is installed, or of an extra left out), but a package the newest releases no longer
    need shows up here."""
    missing = sorted(set(lock) - set(have) - NOT_LOCKED)
    if not missing:
        return None
    more = f", and {len(missing) - shown} more" if len(missing) > shown else ""
    return f"locked, not installed here ({len(missing)}): {', '.join(missing[:shown])}{more}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("--exact", action="store_true",
                        help="exit 1 if an installed package is not at the lock's version (or not in it)")
    args = parser.parse_args(argv)
    try:
        lock, have = read_lock(args.lock), installed()
    except (OSError, ValueError) as e:
        print(f"drift: error: {e}", file=sys.stderr)
        return 2
    rows = differences(lock, have, installed_only=True)
    print(report(str(args.lock), rows))
    missing = None if args.exact else not_installed(lock, have)
    if missing:
        print(missing)
    return 1 if rows and args.exact else 0


if __name__ == "__main__":
    sys.exit(main())
