"""Build the example shop's source database, `shop.db`, from `shop.sql` (both shipped beside this file).

    python assets/pipelines/shop/seed.py            # rewrite assets/pipelines/shop/shop.db
    python assets/pipelines/shop/seed.py OUT.db     # or write it elsewhere

The database is committed so that a fresh clone runs `shop_customers` without this step; run it after
editing `shop.sql` (a test checks that the committed database holds exactly what the script builds).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def seed(database: Path, script: Path = HERE / "shop.sql") -> Path:
    database.unlink(missing_ok=True)
    with sqlite3.connect(database) as connection:
        connection.executescript(script.read_text(encoding="utf-8"))
    connection.close()
    return database


if __name__ == "__main__":
    print(seed(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "shop.db"))
