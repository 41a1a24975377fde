"""Training jobs: submit (`wavecast train`'s options as JSON), list, inspect, follow as server-sent events,
cancel, resume. The work is done by daemon/jobs.py, each job in a worker process of its own."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from wavecast.daemon.api import query_value, route
from wavecast.daemon.jobs import CONFIG_SCHEMAS, KINDS, SETTLED, Jobs

HEARTBEAT_SECONDS = 15.0  # an SSE comment this often, so a follower (and any proxy) sees the stream alive
STATES = ["queued", "running", "succeeded", "failed", "cancelled", "interrupted"]
NUMBER = {"type": ["number", "null"]}
TEXT = {"type": ["string", "null"]}
JOB = {
    "type": "object",
    "required": ["id", "kind", "config", "state", "created", "step", "steps", "loss", "eta_seconds", "result", "error"],
    "properties": {
        "id": {"type": "string"}, "kind": {"enum": list(KINDS)}, "config": {"type": "object"},
        "state": {"enum": STATES}, "created": {"type": "string", "description": "ISO 8601, UTC"},
        "started": TEXT, "ended": TEXT,
        "phase": {"enum": ["data", "train", "export", "verify", "publish", None]},
        "step": {"type": ["integer", "null"]}, "steps": {"type": ["integer", "null"]}, "loss": NUMBER,
        "eta_seconds": NUMBER,
        "checkpoint": TEXT, "checkpoint_step": {"type": ["integer", "null"]},
        "resumed_from": {"type": ["integer", "null"], "description": "the step this attempt began at"},
        "result": {"type": ["object", "null"],
                   "description": "{\"model\", \"version\"} once published, or {\"refused\": why} when the store's "
                                  "gate refused the model"},
        "error": {**TEXT, "description": "why the job failed or was interrupted, and what to do"},
        "pid": {"type": ["integer", "null"], "description": "the worker process, while it runs"},
        "attempts": {"type": "integer"}, "log": {"type": "string", "description": "the job's log file"},
        "log_tail": {"type": "array", "items": {"type": "string"}, "description": "the last lines of its log"},
    },
}
SUBMIT = {
    "type": "object", "required": ["kind"], "additionalProperties": False,
    "properties": {"kind": {"enum": list(KINDS)},
                   "config": {"type": "object", "default": {},
                              "description": "the options of 'wavecast train KIND' (see oneOf)"}},
    # documentation for OpenAPI readers; the handler checks `config` against its kind's schema
    "oneOf": [{"properties": {"kind": {"const": kind}, "config": CONFIG_SCHEMAS[kind]}} for kind in KINDS],
}
KEEP = {"type": "string", "enum": ["true", "false"], "default": "false",
        "description": "true keeps the job's checkpoint, so that POST /v1/jobs/{id}/resume goes on from it"}


def jobs_of(request: web.Request) -> Jobs:
    return request.app["daemon"].jobs


@route("POST", "/v1/jobs", "Submit a training job: 'wavecast train KIND' in a worker process", status=202,
       body=SUBMIT, returns=JOB, errors={429: "the daemon holds --max-jobs queued and running jobs already",
                                         503: "the daemon is stopping"})
async def submit_job(request: web.Request, body: dict) -> web.Response:
    jobs = jobs_of(request)
    job = jobs.submit(body["kind"], body.get("config", {}))
    return web.json_response(jobs.info(job), status=202)


@route("GET", "/v1/jobs", "Every job the daemon knows, oldest first (running, queued and ended)",
       returns={"type": "object", "required": ["jobs"],
                "properties": {"jobs": {"type": "array", "items": JOB}}})
async def list_jobs(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    return web.json_response({"jobs": [jobs.info(j, tail=False) for j in jobs.jobs.values()]})


@route("GET", "/v1/jobs/{id}", "A job: state, step, loss, ETA, result or error, the end of its log",
       returns=JOB, errors={404: "no job has that id"})
async def get_job(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    return web.json_response(jobs.info(jobs.get(request.match_info["id"])))


@route("GET", "/v1/jobs/{id}/events", "A job's progress as server-sent events, until it ends",
       content_type="text/event-stream", errors={404: "no job has that id"}, returns={
           "type": "string",
           "description": "text/event-stream: first a `progress` event with the job as it is, then a `progress` "
                          "event at every change (state, phase, step, loss, checkpoint), each `data` the job as "
                          "GET /v1/jobs/{id} shows it and each `id` one more than the last; when the job has "
                          "settled (succeeded, failed, cancelled or interrupted) an `end` event with the job and "
                          "the end of its log, then the stream closes. A job that has settled already gets only "
                          "the `end` event. Comment lines (': ...') keep the stream alive every 15 s."})
async def job_events(request: web.Request) -> web.StreamResponse:
    jobs = jobs_of(request)
    job = jobs.get(request.match_info["id"])
    queue = jobs.watch(job.id)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await response.prepare(request)
        seen = jobs.seq.get(job.id, 0)
        if job.state in SETTLED:
            await send(response, "end", seen, jobs.info(job))
            return response
        await send(response, "progress", seen, jobs.info(job, tail=False))
        while True:
            try:
                event, seq, info = await asyncio.wait_for(queue.get(), HEARTBEAT_SECONDS)
            except TimeoutError:
                await response.write(b": still there\n\n")
                continue
            if seq <= seen:  # already in the first event
                continue
            await send(response, event, seq, info)
            if event == "end":
                return response
    except ConnectionResetError:  # the follower went away
        return response
    finally:
        jobs.unwatch(job.id, queue)


async def send(response: web.StreamResponse, event: str, seq: int, info: dict) -> None:
    await response.write(f"id: {seq}\nevent: {event}\ndata: {json.dumps(info)}\n\n".encode())


@route("DELETE", "/v1/jobs/{id}", "Cancel a job: its worker stops (SIGTERM, SIGKILL after 5 s), its temporary "
       "files go, and its checkpoint unless keep_checkpoint=true", returns=JOB, query={"keep_checkpoint": KEEP},
       errors={404: "no job has that id", 409: "the job has ended already (succeeded, failed or cancelled)",
               422: "keep_checkpoint is not true or false"})
async def cancel_job(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    keep = query_value(request, "keep_checkpoint", KEEP) == "true"
    job = await jobs.cancel(request.match_info["id"], keep)
    return web.json_response(jobs.info(job))


@route("POST", "/v1/jobs/{id}/resume", "Queue an interrupted, failed or cancelled job again; its run goes on from "
       "its checkpoint if it has one", status=202, returns=JOB,
       errors={404: "no job has that id", 409: "the job is queued, running or has succeeded",
               429: "the daemon holds --max-jobs queued and running jobs already", 503: "the daemon is stopping"})
async def resume_job(request: web.Request) -> web.Response:
    jobs = jobs_of(request)
    return web.json_response(jobs.info(jobs.resume(request.match_info["id"])), status=202)

