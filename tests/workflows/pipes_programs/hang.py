"""A Pipes program for the tests: starts a child that writes its pid, then both sleep for a long time."""

import subprocess
import sys
import time

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    with open(pipes.extras["arguments"]["pid_file"], "w") as handle:
        handle.write(f"{child.pid}\n")
    pipes.log.info("sleeping")
    time.sleep(600)
