"""Write each Space's settings table into its README.md, from the Space's own settings module (its one source).

python scripts/settings_tables.py          # rewrite the tables
python scripts/settings_tables.py --check  # exit 1 if a README's table differs (tests/test_settings.py)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SPACES = {"private_space": "back_settings", "public_space": "front_settings"}  # each Space's settings module
BEGIN = "<!-- settings: written by scripts/settings_tables.py from the settings module -->"
END = "<!-- end of settings -->"


def settings_of(space: str) -> ModuleType:
    """The Space's settings module, loaded on its own (it needs only environment.py beside it) as the app reads it,
    apart from any copy already imported (it reads the environment as it is now)."""
    folder = ROOT / space
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"{space}_settings", folder / f"{SPACES[space]}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(folder))


def with_table(readme: str, table: str) -> str:
    """`readme` with the text between the markers replaced by `table`."""
    head, found, rest = readme.partition(BEGIN)
    _, ended, tail = rest.partition(END)
    if not (found and ended):
        raise SystemExit(f"a README lacks the markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n{table}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table is not up to date")
    args = parser.parse_args()
    stale = []
    for space in SPACES:
        readme = ROOT / space / "README.md"
        text = readme.read_text()
        updated = with_table(text, settings_of(space).SETTINGS.table())
        if updated != text:
            stale.append(space)
            if not args.check:
                readme.write_text(updated)
    if args.check and stale:
        print(f"out of date: {', '.join(stale)}/README.md; run python scripts/settings_tables.py")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
