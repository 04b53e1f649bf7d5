"""A Pipes program for the tests: echoes what it was given, reports outputs, metadata, a materialization."""

import os
import sys

from dagster_pipes import open_dagster_pipes

with open_dagster_pipes() as pipes:
    arguments = pipes.extras["arguments"]
    pipes.log.info(f"hello from pid {os.getpid()}")
    print("a line on stderr that is not a failure", file=sys.stderr)
    pipes.report_custom_message({"outputs": {"greeting": f"hello {arguments['who']}", "count": 1}})
    pipes.report_custom_message({"outputs": {"count": 2}, "metadata": {"rows": 42, "table": "orders"}})
    pipes.report_custom_message(["something", "else"])
    pipes.report_asset_materialization(asset_key="pipes_report", metadata={"rows": 42})
    print(
        "|".join(
            [
                os.environ.get("JUNCTION_TEST_GREETING", "-"),
                os.getcwd(),
                pipes.extras["execution_id"],
                str(pipes.extras["inputs"].get("who")),
            ]
        ),
        file=open(arguments["echo_file"], "w"),  # noqa: SIM115 - one line, closed at exit
    )
