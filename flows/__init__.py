"""Prefect flows: thin orchestration over ``nasfcos`` and ``storage``.

Owns the pipeline's config, the stage bookkeeping (``stages``), placement on devices,
preflight checks and one flow per stage; may import ``nasfcos``, ``storage``,
``atomicio`` and ``flows.report`` (which in turn never imports Prefect).

Defaults set before Prefect is imported: offline (no telemetry, no analytics), the
library's loggers forwarded to the Prefect UI, and two minutes for a temporary Prefect
server to start (Prefect's 20 s fail a run on a busy machine: "Timed out while attempting
to connect to ephemeral Prefect API server").
"""

import os

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "nasfcos,storage")
# library code also runs outside flows (CLI, tests): its logs then stay local, silently
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
