"""The dashboard: a one-page app at / (its assets under /dashboard/), and the JSON it reads.

The page itself is public and holds no secrets; everything it shows comes from /v1/dashboard/*,
which needs the server's API key like the rest of /v1 (the page asks for it).

- state: every stage (device, node, layers, memory, KV, step times), the numbers /metrics
  exports (with percentiles over the last minute), and the failures and recoveries;
- catalog: the models and devices the estimate and plan forms offer;
- estimate / plan: `shardwise estimate --json` / `shardwise plan --json` for the form's inputs.
"""

from __future__ import annotations

import asyncio
import time
from importlib import resources
from typing import Any

import yaml
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from shardwise.errors import ShardwiseError
from shardwise.llm import LLM
from shardwise.serve.async_engine import AsyncEngine
from shardwise.serve.http import ApiError, invalid, read_bytes
from shardwise.serve.metrics import Metrics

STATS_TIMEOUT_S = 2.0  # a stage that takes longer to report is shown with its last known numbers
FORM_BODY_BYTES = 64 << 10


class PlanQuery(BaseModel):
    """The plan form: a cluster (a cluster file's YAML text, or its parsed dict) and the costs' point."""

    model_config = ConfigDict(extra="forbid")

    model: str
    cluster: str | dict[str, Any]
    objective: str = "latency"
    batch: int | None = None  # (planning_batch's default)
    context: int = 512
    kv_tokens: int = 16384
    quant: str | None = None

    def run(self) -> dict[str, Any]:
        from shardwise.model.catalog import load_spec
        from shardwise.planner.topology import Cluster, plan_cluster, planning_batch

        batch = planning_batch(self.objective, self.batch)
        if min(batch, self.context, self.kv_tokens) < 1:
            raise ShardwiseError("batch, context and kv_tokens must each be at least 1")
        try:
            data = yaml.safe_load(self.cluster) if isinstance(self.cluster, str) else self.cluster
        except yaml.YAMLError as e:
            raise ShardwiseError(f"the cluster is not valid YAML ({e})") from None
        # base=None: catalog devices only, never a file named by the form
        cluster = Cluster.from_dict(data, base=None)
        _, summary = plan_cluster(load_spec(self.model), cluster, self.objective, batch=batch,
                                  context=self.context, quant=self.quant, kv_tokens=self.kv_tokens)
        return summary


def add_dashboard_routes(app: FastAPI, llm: LLM, engine: AsyncEngine, metrics: Metrics, authorize) -> None:
    static = resources.files("shardwise.serve").joinpath("dashboard")
    app.mount("/dashboard", StaticFiles(directory=str(static)), name="dashboard")
    page = static.joinpath("index.html").read_text()
    last_stages: dict[str, Any] = {"stages": [], "time": None}  # shown while the stages cannot answer

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/v1/dashboard/state", dependencies=[Depends(authorize)])
    async def state() -> dict[str, Any]:
        stale = None
        try:
            stages = await asyncio.wait_for(engine.call(lambda: llm.stage_stats(STATS_TIMEOUT_S)),
                                            STATS_TIMEOUT_S + 1)
            last_stages.update(stages=stages, time=time.time())
        except Exception as e:  # busy recovering, or a stage is gone: say so, show what was known
            stale = f"the stages did not report ({type(e).__name__}): numbers as last seen"
        return {"model": llm.name, "time": time.time(), "running": engine.running, "failure": engine.failure,
                "stages": last_stages["stages"], "stages_time": last_stages["time"], "stale": stale,
                "metrics": metrics.snapshot(), "events": llm.events()}

    @app.get("/v1/dashboard/catalog", dependencies=[Depends(authorize)])
    async def catalog() -> dict[str, Any]:
        from shardwise.model.catalog import catalog as models
        from shardwise.perf.hardware import catalog_devices

        devices = {name: {"kind": d.kind, "memory_gb": d.memory_bytes / 1e9} for name, d in catalog_devices().items()}
        return {"served": llm.name, "models": list(models()), "devices": devices}

    @app.post("/v1/dashboard/estimate", dependencies=[Depends(authorize)])
    async def estimate(request: Request) -> dict[str, Any]:
        from shardwise.perf.plot import roofline
        from shardwise.perf.query import EstimateQuery

        query = await _form(request, EstimateQuery)
        _catalog_models([query.model, query.draft])
        est, device = await _answer(lambda: query.run(files=False))
        return {"estimate": est.to_dict(), "roofline": roofline(est, device)}

    @app.post("/v1/dashboard/plan", dependencies=[Depends(authorize)])
    async def plan(request: Request) -> dict[str, Any]:
        query = await _form(request, PlanQuery)
        _catalog_models([query.model])
        return await _answer(query.run)


def _catalog_models(models: list[str | None]) -> None:
    """The forms name catalog models only: a path would let an API user read files on the server
    (devices are held to the catalog where they are loaded)."""
    from shardwise.model.catalog import catalog

    for name in filter(None, models):
        if name.lower() not in catalog():
            raise ApiError(400, f"unknown model '{name}': the dashboard estimates catalog models "
                                f"({', '.join(catalog())}); use `shardwise estimate` for files", param="model")


async def _form(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await read_bytes(request, FORM_BODY_BYTES))
    except ValidationError as e:
        raise invalid(e) from None


async def _answer(run) -> Any:
    """run() off the event loop; a user mistake in the form is a 400 naming it."""
    try:
        return await run_in_threadpool(run)
    except ShardwiseError as e:
        raise ApiError(400, str(e)) from None
