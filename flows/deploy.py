"""Deployments of the pipeline on the stack's work pool: a schedule and a data-arrival trigger.

``ftflow deploy configs/demo.yaml [section.key=value ...] --cron "0 3 * * *" --watch inbox/``
registers, on the Prefect server of ``ftflow up`` (or ``PREFECT_API_URL``), for the stack's
process worker to run:

- ``finetune-pipeline/nightly``: the pipeline on a cron schedule;
- ``finetune-pipeline/on-new-data`` (with ``--watch``): the pipeline on exactly the files an
  ``ftflow.data.arrived`` event names (flows/arrival.py);
- ``watch-inbox/poll`` (with ``--watch``): every 15 s, announces the complete new files of
  the inbox in one such event (state in the ftflow home).

Nothing stays in the foreground: the worker imports the flows from the installed package
(module-path entrypoints, no source to pull) and runs them in the directory ``deploy`` ran
in, so relative paths in a config mean what they mean to ``ftflow run``.

A redeploy keeps what a user changed in the UI. Prefect's own ``RunnerDeployment.apply`` (and
so ``flow.deploy``) sends the schedules and parameters it was built with on every update, and
the server then deletes the deployment's schedules and recreates them (an empty list deletes
them all): edits made in the UI are lost. ``register`` instead remembers what it last applied
(``<home>/deployments.json``) and replaces the schedules/parameters on the server only while
they are still what it applied; ``--replace`` overwrites them anyway.
"""

from __future__ import annotations

import ast
import asyncio
import copy
import importlib.util
import inspect
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from data_contracts.config import load_config
from flows.arrival import DATA_EVENT, inbox_resource

LAST_APPLIED = "deployments.json"


PIPELINE = "flows.pipeline.finetune_pipeline"  # module paths: the worker imports the
POLLER = "flows.arrival.watch_inbox"            # installed package, there is nothing to pull


@dataclass
class Spec:
    """One deployment as ``ftflow deploy`` wants it."""

    entrypoint: str
    name: str
    parameters: dict[str, Any]
    cron: str | None = None
    interval_s: int | None = None
    queue: str = "default"
    triggers: list[Any] = field(default_factory=list)

    @property
    def flow_name(self) -> str:
        # read from the source (AST): importing the pipeline costs 30 s of CPU
        from prefect.flows import load_flow_arguments_from_entrypoint

        return load_flow_arguments_from_entrypoint(self.entrypoint, ["name"])["name"]

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"

    def schedules(self) -> list[Any]:
        from prefect.client.schemas.actions import DeploymentScheduleCreate
        from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

        if self.cron:
            return [DeploymentScheduleCreate(schedule=CronSchedule(cron=self.cron))]
        if self.interval_s:
            return [DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=timedelta(seconds=self.interval_s)))]
        return []


def specs(config_path: str | None, overrides: list[str], cron: str, watch: str | None,
          poll_s: int = 15, settle_s: float = 5.0, home: str | Path | None = None
          ) -> list[Spec]:
    from prefect.events import DeploymentEventTrigger

    params = {"config_path": config_path, "overrides": list(overrides)}
    out = [Spec(PIPELINE, "nightly", params, cron=cron)]
    if watch:
        inbox = Path(watch).absolute()
        # The watcher announces a burst once it has settled, and a run claims its files (so a
        # repeated event reads nothing): no debounce window that could swallow a file. The
        # event's file list becomes the run's `files`; config and overrides stay the
        # deployment's own (the server merges them), so UI edits apply to triggered runs too.
        out.append(Spec(PIPELINE, "on-new-data", params, triggers=[
            DeploymentEventTrigger(
                expect={DATA_EVENT}, match={"prefect.resource.id": inbox_resource(inbox)},
                parameters={"files": "{{ event.payload.files }}"})]))
        # The watcher keeps its state where the runs claim files: the runs' ftflow home.
        home = home or load_config(config_path, overrides).run.home
        out.append(Spec(POLLER, "poll", {"inbox": str(inbox), "home": str(home),
                                         "settle_s": settle_s}, interval_s=poll_s,
                        queue=WATCH_QUEUE))
    return out


def parameter_schema(entrypoint: str) -> Any:
    """The flow's parameter schema (the UI's run form) from its source, importing nothing.

    Prefect's parameter_schema_from_entrypoint runs the module's imports (the pipeline's take
    30 s of CPU); the signature alone needs only builtins.
    """
    from prefect.utilities.callables import generate_parameter_schema, parameter_docstrings

    module, func = entrypoint.rsplit(".", 1)
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.origin:
        raise ValueError(f"cannot find module {module!r}")
    tree = ast.parse(Path(spec.origin).read_text())
    fn = next(n for n in tree.body
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == func)
    doc = ast.get_docstring(fn)
    stub = copy.deepcopy(fn)
    stub.decorator_list, stub.body, stub.returns = [], [ast.Pass()], None
    namespace: dict[str, Any] = {"Any": Any, "Optional": Optional, "Path": Path}
    exec(compile(ast.fix_missing_locations(ast.Module([stub], [])), spec.origin, "exec"),
         namespace)
    return generate_parameter_schema(inspect.signature(namespace[func]),
                                     parameter_docstrings(doc))


def _schedules_of(deployment: Any) -> list[dict[str, Any]]:
    """A deployment's schedules as comparable JSON (what the UI edits)."""
    return sorted((
        {"schedule": s.schedule.model_dump(mode="json", exclude_none=True), "active": s.active}
        for s in deployment.schedules or []), key=lambda d: json.dumps(d, sort_keys=True))


def _observed(deployment: Any) -> dict[str, Any]:
    return {"parameters": deployment.parameters or {}, "schedules": _schedules_of(deployment)}


async def _apply(client: Any, spec: Spec, pool: str, job_variables: dict[str, Any],
                 last: dict | None, replace: bool) -> tuple[str, dict, dict]:
    """Create or update one deployment.

    Returns what happened, what the server now has, and the record of what was applied.
    """
    from prefect.client.schemas.actions import DeploymentScheduleUpdate, DeploymentUpdate
    from prefect.exceptions import ObjectNotFound
    schema = parameter_schema(spec.entrypoint).model_dump(exclude_unset=True)
    common: dict[str, Any] = dict(
        entrypoint=spec.entrypoint, path=None, pull_steps=[], work_pool_name=pool,
        work_queue_name=spec.queue, job_variables=job_variables,
        parameter_openapi_schema=schema)
    try:
        existing = await client.read_deployment_by_name(spec.full_name)
    except ObjectNotFound:
        existing = None
    if existing is None:
        flow_id = await client.create_flow_from_name(spec.flow_name)
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name=spec.name, schedules=spec.schedules(),
            parameters=spec.parameters, **common)
        what, kept = "created", []
    else:
        deployment_id = existing.id
        observed = _observed(existing)
        kept, update = [], dict(common)
        # Replace what the server holds only while it is what this home last applied: a
        # difference is an edit made in the UI (or by another home), and it stays.
        if replace or (last is not None and observed["parameters"] == last.get("parameters")):
            update["parameters"] = spec.parameters
        else:
            kept.append("parameters")
        if replace or (last is not None and observed["schedules"] == last.get("schedules")):
            update["schedules"] = [DeploymentScheduleUpdate(schedule=s.schedule, active=s.active)
                                   for s in spec.schedules()]
        else:
            kept.append("schedules")
        await client.update_deployment(deployment_id, DeploymentUpdate(**update))
        what = "updated" + (f", kept the {' and '.join(kept)} it has on the server "
                            "(changed there since this home last deployed; --replace "
                            "overwrites them)" if kept else "")
    # Triggers cannot be diffed: the deployment's own automations are replaced (as Prefect's
    # RunnerDeployment.apply does).
    await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
    for trigger in spec.triggers:
        trigger.set_deployment_id(deployment_id)
        await client.create_automation(trigger.as_automation())
    now = _observed(await client.read_deployment(deployment_id))
    # What this home applied, as the server stores it; a kept field keeps its old record, so
    # the user's edit stays until --replace.
    applied = {k: (last or {}).get(k) if k in kept else v for k, v in now.items()}
    return what, now, {k: v for k, v in applied.items() if v is not None}


# The watcher's runs wait in a queue of their own, after the pipeline's: the worker runs one
# flow at a time, so with one queue a backlog of watcher runs (every 15 s, while a pipeline run
# holds the worker) went first, by schedule time, and a data-triggered run waited behind it.
WATCH_QUEUE, WATCH_PRIORITY = "watch", 10


async def _ensure_pool(pool: str) -> bool:
    """The work pool exists (created as a process pool if not), with the watcher's queue
    behind the default one; True if a worker polls it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    async with get_client() as client:
        try:
            await client.read_work_pool(pool)
        except ObjectNotFound:
            from prefect.workers.process import ProcessWorker

            await client.create_work_pool(WorkPoolCreate(
                name=pool, type="process",
                base_job_template=ProcessWorker.get_default_base_job_template()))
        try:
            await client.create_work_queue(name=WATCH_QUEUE, work_pool_name=pool,
                                           priority=WATCH_PRIORITY)
        except ObjectAlreadyExists:
            queue = await client.read_work_queue_by_name(WATCH_QUEUE, work_pool_name=pool)
            if queue.priority != WATCH_PRIORITY:
                await client.update_work_queue(queue.id, priority=WATCH_PRIORITY)
        workers = await client.read_workers_for_work_pool(pool)
    return any(str(getattr(w.status, "value", w.status)) == "ONLINE" for w in workers)


def register(home: Path, api_url: str, config_path: str | None, overrides: list[str],
             cron: str, watch: str | None, pool: str, replace: bool = False) -> list[str]:
    """Register the deployments; returns one line per deployment."""
    home = Path(home).absolute()
    record_path = home / LAST_APPLIED
    try:
        record = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        record = {}
    job_variables = {"working_dir": str(Path.cwd()), "env": {"FTFLOW_HOME": str(home)}}
    tracking = os.environ.get("FTFLOW_TRACKING_URI")
    if tracking:  # the stack's MLflow server, for runs that set no run.tracking_uri
        job_variables["env"]["FTFLOW_TRACKING_URI"] = tracking

    async def run() -> list[str]:
        lines = []
        if not await _ensure_pool(pool):
            lines.append(f"note: no worker polls pool {pool!r} yet: `ftflow up` starts one "
                         f"(or: prefect worker start --pool {pool})")
        from prefect.client.orchestration import get_client

        async with get_client() as client:
            results = []
            for spec in specs(config_path, overrides, cron, watch, home=home):
                key = f"{api_url} {spec.full_name}"
                results.append((spec, key, *await _apply(
                    client, spec, pool, job_variables, record.get(key), replace)))
        for spec, key, what, now, applied in results:
            record[key] = applied
            sched = ", ".join(json.dumps(s["schedule"]) for s in now["schedules"]) or (
                "on event " + DATA_EVENT if spec.triggers else "no schedule")
            lines.append(f"{spec.full_name}: {what} on pool {pool!r}; {sched}")
        return lines

    lines = asyncio.run(run())
    record_path.parent.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True))
    return lines
