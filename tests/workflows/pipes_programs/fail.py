"""A Pipes program for the tests: writes to stderr and exits 3."""

import sys

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    for line in range(30):
        print(f"noise {line}", file=sys.stderr)
    print("the ledger is closed", file=sys.stderr)
sys.exit(3)
