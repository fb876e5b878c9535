"""Write the settings table into the README, between its markers, from service/settings.py.

    python scripts/readme_settings.py [README.md]      (make readme)

The table is `python -m service --print-settings-table`; tests/unit/test_settings.py fails while the README's
differs from it, so a setting added, renamed or redescribed is documented by running this once.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from service.settings import settings_table  # noqa: E402

START, END = "<!-- settings-table: start -->\n", "<!-- settings-table: end -->"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        print(f"{path}: the markers {START.strip()} and {END} are missing", file=sys.stderr)
        return 1
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    updated = head + START + settings_table() + END + tail
    if updated != text:
        path.write_text(updated, encoding="utf-8")
        print(f"{path}: settings table updated")
    else:
        print(f"{path}: settings table already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
