"""The one place where Junction's Dagster `Definitions` are assembled (loaded by workspace.yaml).

Loading must stay light: nothing here imports great_expectations or other heavy libraries; they are
imported inside the ops and checks that use them.
"""

import importlib
import pkgutil
import warnings
from types import ModuleType

import dagster as dg

import assets
from assets.etl.factory import pipeline_definitions
from assets.etl.spec import load_pipelines, pipeline_files
from orchestration import platform_definitions
from orchestration.cache_definitions import cache_definitions
from orchestration.settings import get_settings
from orchestration.workflows.factory import workflow_definitions
from resources.cache import CacheResource
from sensors.alerts.sensor import alert_definitions
from sensors.definitions import streaming_definitions
from sensors.notification_digests import notification_definitions
from sensors.performance import performance_definitions

# The ETL library lives under `assets/` beside the analysts' modules but defines nothing itself; its
# REST modules import httpx, which the code location must not pay for at load.
LIBRARY_PACKAGES = ("assets.etl",)


def analyst_modules(package: ModuleType) -> list[ModuleType]:
    """Every module under `package`, nested packages included, except the ETL library's."""
    found = [package]
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        if info.name in LIBRARY_PACKAGES:
            continue
        module = importlib.import_module(info.name)
        found.extend(analyst_modules(module) if info.ispkg else [module])
    return found


def analyst_definitions(package: ModuleType = assets) -> dg.Definitions:
    """Every module an analyst adds under `assets/` is picked up here without touching this file."""
    with warnings.catch_warnings():
        # `load_definitions_from_modules` is marked preview; it is the one loader that also picks up
        # the jobs, schedules and sensors an analyst writes beside their assets.
        warnings.simplefilter("ignore", dg.PreviewWarning)
        return dg.load_definitions_from_modules(analyst_modules(package))


# Loaded once: the asset factory and the stream triggers both read the same specs.
pipelines = load_pipelines(pipeline_files(get_settings().pipelines_dir))

defs = dg.Definitions.merge(
    analyst_definitions(),
    platform_definitions.platform_definitions,
    # Workflow specs (`orchestration/workflows/*.yaml`): a bad spec fails the code location with
    # every problem in the kernel's format.
    workflow_definitions(get_settings().workflows_dir),
    # ETL pipeline specs (`assets/pipelines/*.yaml`): staged + published assets, checks, job, schedule.
    pipeline_definitions(pipelines=pipelines),
    # Stream triggers of pipeline specs and the sensors publishing platform happenings to streams.
    streaming_definitions(pipelines=pipelines),
    # Digests of throttled and digesting notification channels (resources/channels.yaml).
    notification_definitions(),
    # Alert rules (resources/alerts.yaml): a bad file fails the code location in the kernel's format.
    alert_definitions(get_settings().alerts_file),
    # Every finished run's queue wait, duration, rows/s and step times, as a time series.
    performance_definitions(),
    # The multi-layer cache, for any asset or op that asks for `cache: CacheResource`, with its
    # statistics and warming assets (a bad caches.yaml fails the code location here).
    cache_definitions(get_settings().caches_file),
    dg.Definitions(resources={"cache": CacheResource()}),
)
