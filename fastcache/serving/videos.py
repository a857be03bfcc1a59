"""``/v1/videos``: OpenAI's videos API, a job API, on a server whose model makes video.

``POST /v1/videos`` (JSON, or multipart with an ``input_reference`` image) answers at once with a job object,
``queued``; ``GET /v1/videos/{id}`` follows it (``in_progress`` with its ``progress``, then ``completed`` or
``failed`` with an ``error``); ``GET /v1/videos/{id}/content`` is its MP4; ``GET /v1/videos`` a page of jobs
(``limit``, ``after``, ``order``); ``DELETE /v1/videos/{id}`` removes one (a running one stops). Errors are the
server's one format; the edge (keys, body limit, read deadline) covers these routes as every other, and a body is
checked as the images API's are before it is parsed (JSON at most ``api.MAX_JSON_DEPTH`` deep, form text in UTF-8;
an unknown field is refused). ``/openapi.json`` lists these routes with their errors on a video server. On a server
whose model makes images, every one of them answers 400 naming what it serves.
"""

from __future__ import annotations

import asyncio
import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import api
from .engine import ShuttingDown
from .errors import error_response
from .jobs import JobLimit
from .request import InvalidRequest
from .video_jobs import NotReady, VideoJobs, job_object
from .video_request import VideoBody, VideoForm, field_rules, video_request

VIDEOS = "/v1/videos"
MAX_PAGE = 100
JOB_ID = re.compile(r"video_[0-9a-f]{32}")
RETRY_AFTER_S = 10  # a video job takes a while: a full server is asked again no sooner
_CHUNK = 1 << 20
# the routes' errors in /openapi.json, in the one format
VIDEO_ERRORS = {
    **api.EDGE_ERRORS,
    404: api.error_doc("no video of that id on this server (a finished one is kept --video-ttl seconds)"),
    409: api.error_doc("the video is not completed yet, or failed"),
    429: api.error_doc("too many video jobs, or this client holds too many connections", "Retry-After"),
    503: api.error_doc("warming up, shutting down, or too many connections", "Retry-After"),
}


def _errors(*cannot: int) -> dict:
    """``VIDEO_ERRORS`` but the statuses a route ``cannot`` answer."""
    return {status: doc for status, doc in VIDEO_ERRORS.items() if status not in cannot}


def install(app: FastAPI, service) -> VideoJobs | None:
    """Add the video routes to ``app`` (``server.make_app``) for ``service``; its ``VideoJobs`` (``None`` without a
    video model), which the app's lifespan starts and stops. On a video server the app's field rules (which the one
    error format adds to a bad field's message) are the video fields'."""
    if service.video is None:
        _refuse_all(app, service)
        return None
    engine, model = service.engine, service.video
    jobs = VideoJobs(model, service.options.model_name, service.metrics.registry)
    app.state.field_rules = field_rules(model)  # this server serves no images

    @app.post(VIDEOS, operation_id="create_video", responses={200: {"description": "the job, queued"},
                                                              **_errors(404, 409)})
    async def create(http: Request):
        if not engine.ready.is_set():
            return error_response(503, "the server is warming up; retry shortly.", code="warming_up", retry_after=5)
        try:
            fields, upload = await _read_body(http)
            request = await asyncio.to_thread(video_request, fields, upload, model)
            job = await asyncio.to_thread(jobs.submit, request)
        except InvalidRequest as error:
            return error_response(400, str(error), error.param, code="invalid_value")
        except JobLimit as error:
            return error_response(429, f"too many video jobs: {error}; retry later.", code="too_many_jobs",
                                  retry_after=RETRY_AFTER_S)
        except ShuttingDown as error:
            return error_response(503, str(error), code="shutting_down")
        except ClientDisconnect:  # the edge answered already (408, 413) or the client left: nothing to say
            return error_response(499, "the client closed the request.", code="client_closed")
        return job_object(job)

    @app.get(VIDEOS, operation_id="list_videos", responses={200: {"description": "a page of jobs"},
                                                            **_errors(404, 409)})
    async def list_videos(http: Request):
        try:
            limit, after, order = _page_query(http)
            page, more = await asyncio.to_thread(jobs.page, limit, after, order)
        except InvalidRequest as error:
            return error_response(400, str(error), error.param, code="invalid_value")
        except KeyError:
            return error_response(400, f"after must be the id of a video on this server; no video {after[:64]!r}.",
                                  "after", code="invalid_value")
        data = [job_object(job) for job in page]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}

    @app.get(VIDEOS + "/{video_id}", operation_id="retrieve_video",
             responses={200: {"description": "the job"}, **_errors(409)})
    async def retrieve(video_id: str):
        job = await asyncio.to_thread(jobs.get, video_id) if JOB_ID.fullmatch(video_id) else None
        return job_object(job) if job else _unknown(video_id, model)

    @app.get(VIDEOS + "/{video_id}/content", operation_id="video_content", response_class=StreamingResponse,
             responses={200: {"description": "the MP4", "content": {"video/mp4": {"schema": {
                 "type": "string", "format": "binary"}}}}, **_errors()})
    async def content(video_id: str, http: Request):
        variant = http.query_params.get("variant", "video")
        if variant != "video":
            return error_response(400, f"variant must be 'video' (this server makes no thumbnails or spritesheets); "
                                       f"got {variant[:40]!r}.", "variant", code="invalid_value")
        if not JOB_ID.fullmatch(video_id):
            return _unknown(video_id, model)
        try:
            handle, size = await asyncio.to_thread(jobs.open_content, video_id)
        except KeyError:
            return _unknown(video_id, model)
        except NotReady as not_ready:
            job = not_ready.job
            why = (f"failed ({job['error_message']})" if job["status"] == "failed" else
                   f"is {job['status']} ({job['progress']}%); its content is there once its status is completed")
            return error_response(409, f"video {video_id} {why}.", code="video_not_ready")
        return StreamingResponse(_chunks(handle), media_type="video/mp4", headers={
            "content-length": str(size), "content-disposition": f'attachment; filename="{video_id}.mp4"'})

    @app.delete(VIDEOS + "/{video_id}", operation_id="delete_video",
                responses={200: {"description": "the job is deleted"}, **_errors(409)})
    async def delete(video_id: str):
        job = await asyncio.to_thread(jobs.delete, video_id) if JOB_ID.fullmatch(video_id) else None
        if job is None:
            return _unknown(video_id, model)
        return {"id": job["id"], "object": "video.deleted", "deleted": True}

    return jobs


async def _read_body(http: Request):
    """The fields of a ``POST /v1/videos`` and its ``input_reference`` file (bytes, or ``None``): JSON, or a form
    (multipart/form-data; url-encoded without a file). A field that is not valid is ``RequestValidationError`` (the
    one error format names the field's rule)."""
    content_type = http.headers.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media in ("multipart/form-data", "application/x-www-form-urlencoded"):
        body = await http.body()  # read once: the form below parses the same bytes
        problem = api.form_text_problem(body, content_type) if media == "multipart/form-data" else None
        if problem:
            raise InvalidRequest(*problem)
        try:
            form = await http.form(max_files=1, max_fields=32)
        except HTTPException as error:  # starlette's parser: a malformed body, too many files or fields
            raise InvalidRequest(f"the form could not be read ({error.detail}).") from None
        try:
            texts, upload = {}, None
            for name, value in form.multi_items():
                if name in texts or (upload is not None and name == "input_reference"):
                    raise InvalidRequest(f"{name[:40]} is given twice; give each field once.", name[:40])
                if isinstance(value, str):
                    texts[name] = value
                elif name == "input_reference":
                    upload = await value.read()
                else:
                    raise InvalidRequest(f"{name[:40]!r} is not a file field of this request; the one file is "
                                         f"input_reference.", name[:40])
            return _validated(VideoForm, texts), upload
        finally:
            await form.close()
    if media in ("", "application/json") or media.endswith("+json"):
        body = await http.body()
        problem = api.depth_problem(body, "the request body")
        if problem:  # before the parser recurses once per level
            raise InvalidRequest(problem)
        return _validated(VideoBody, _json(body)), None
    raise InvalidRequest(f"the request body must be JSON (Content-Type: application/json) or a form "
                         f"(multipart/form-data, with an input_reference file); got Content-Type {media[:60]!r}.")


def _json(body: bytes):
    """A JSON body read as FastAPI reads the images API's (the same errors, in the one format): ``None`` if empty."""
    if not body:
        return None
    try:
        return json.loads(body)
    except json.JSONDecodeError as error:
        raise RequestValidationError([{"type": "json_invalid", "loc": ("body", error.pos),
                                       "msg": "JSON decode error"}]) from None
    except Exception as error:  # not UTF-8, nested too deeply, a number too long: errors.py says which
        raise HTTPException(400, "There was an error parsing the body") from error


def _validated(model, data):
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_url=False, include_context=False,
                                                  include_input=False)) from None


def _page_query(http: Request) -> tuple[int, str | None, str]:
    """``limit`` (1 to ``MAX_PAGE``, default 20), ``after`` (a video's id) and ``order`` (``asc``/``desc``)."""
    query = http.query_params
    unknown = sorted(set(query) - {"limit", "after", "order"})
    if unknown:
        raise InvalidRequest(f"{unknown[0][:40]!r} is not a parameter of this request; parameters: limit, after, "
                             f"order.", unknown[0][:40])
    text = query.get("limit", "20")
    if not (text.isascii() and text.isdigit() and len(text) <= 4 and 1 <= int(text) <= MAX_PAGE):
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_PAGE}; got {text[:40]!r}.", "limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc' (by creation); got {order[:40]!r}.", "order")
    return int(text), query.get("after"), order


def _unknown(video_id: str, model):
    return error_response(404, f"no video {video_id[:64]!r} on this server (a finished video is kept "
                               f"{model.options.ttl:g} s, then removed).", code="video_not_found")


async def _chunks(handle):
    try:
        while chunk := await asyncio.to_thread(handle.read, _CHUNK):
            yield chunk
    finally:
        handle.close()


def _refuse_all(app: FastAPI, service) -> None:
    """Every video route answers 400 naming what this server serves."""
    message = (f"this server's model ({service.options.model_name}) makes images, not video: POST "
               f"/v1/images/generations (GET /v1/models says what it serves).")

    async def refuse():
        return error_response(400, message, "model", code="video_not_served")

    for path in (VIDEOS, VIDEOS + "/{video_id}", VIDEOS + "/{video_id}/content"):
        app.add_api_route(path, refuse, methods=["GET", "POST", "DELETE"], include_in_schema=False)
