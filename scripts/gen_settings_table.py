"""Write the README's configuration table from the settings classes (`llmo config --markdown`).

    python scripts/gen_settings_table.py          # rewrite the generated section of README.md
    python scripts/gen_settings_table.py --check  # exit 1 when README.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from llmo.cli.config import readme_path, render_markdown, replace_marked_section


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only check; exit 1 when the table is stale.")
    parser.add_argument("--readme", type=Path, default=readme_path(), help="The README to update (default: the repository's).")
    args = parser.parse_args(argv)
    current = args.readme.read_text()
    fresh = replace_marked_section(current, render_markdown())
    if fresh == current:
        return 0
    if args.check:
        print(f"{args.readme} is stale: run python scripts/gen_settings_table.py", file=sys.stderr)
        return 1
    args.readme.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
