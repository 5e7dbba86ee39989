"""Request bodies: JSON read under the size limit, then checked field by field. Pure,
apart from `read_json`; every refusal is an ApiError naming the field."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from aiohttp import web

from clients.gateway.errors import ApiError

MAX_SEED = 2**63 - 1
# Deepest nesting a body may have: the deepest real body (a run's params with its LoRA
# list) is 4; json.loads would recurse up to the interpreter's limit and then raise.
MAX_JSON_DEPTH = 16
MAX_IMAGES = 10  # OpenAI's own cap on `n`
SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
# OpenAI fields with no meaning here, accepted (so that clients sending them work) and ignored.
OPENAI_IGNORED = ("user", "quality", "style", "moderation", "background", "output_compression")


async def read_json(request: web.Request) -> dict:
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"expected Content-Type application/json, got {request.content_type or 'none'}", "Content-Type")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(413, "body_too_large", f"the body exceeds {exc.max_size} bytes", "body") from None
    too_deep = ApiError(400, "body_too_deep", f"the body nests deeper than {MAX_JSON_DEPTH} levels", "body")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise too_deep from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}", "body") from None
    if json_depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise too_deep
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_body", f"the body must be a JSON object, got {type(body).__name__}", "body")
    return body


def json_depth(value, limit: int) -> int:
    """How deeply `value` nests (a scalar: 0), counted without recursion and no further than `limit` + 1."""
    depth, level = 0, [value]
    while level and depth <= limit:
        containers = [v for v in level if isinstance(v, (dict, list))]
        if not containers:
            break
        depth += 1
        level = [child for c in containers for child in (c.values() if isinstance(c, dict) else c)]
    return depth


def _str(body: dict, name: str, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ApiError(400, "invalid_param", f"{name} is required and must be a non-empty string", name)
    return value


def parse_run(body: dict) -> tuple[str, dict]:
    """POST /v1/runs: {"workflow": NAME, "params": {...}}."""
    for name in body:
        if name not in ("workflow", "params"):
            raise ApiError(400, "invalid_param", f"unknown field {name!r} (fields: workflow, params)", name)
    workflow = _str(body, "workflow")
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise ApiError(400, "invalid_param", f"params must be an object, got {type(params).__name__}", "params")
    return workflow, params


@dataclass
class ImagesRequest:
    workflow: str
    params: list[dict]  # one per image, each with its own seed
    size_given: bool

    def openai_field(self, field: str | None) -> str | None:
        """A broker field name (`params.width`) as the OpenAI request named it (`size`)."""
        if field is None:
            return None
        if field == "workflow":
            return "model"
        name = field.removeprefix("params.")
        if self.size_given and name in ("width", "height"):
            return "size"
        return name


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, "invalid_param", f"{name} must be an integer in {low}..{high}, got {value!r}", name)
    return value


def parse_images(body: dict, rng: random.Random | None = None) -> ImagesRequest:
    """POST /v1/images/generations: OpenAI's fields, the rest as the workflow's parameters."""
    extra = {k: v for k, v in body.items()
             if k not in ("model", "prompt", "n", "size", "response_format", "output_format", "stream",
                          "partial_images", *OPENAI_IGNORED)}
    workflow, prompt = _str(body, "model"), _str(body, "prompt")
    n = _int(body, "n", 1, 1, MAX_IMAGES)
    if body.get("response_format") not in (None, "b64_json"):
        raise ApiError(400, "unsupported_value", f"response_format {body['response_format']!r} is not supported: "
                       "this gateway keeps no image URLs; ask for b64_json", "response_format")
    if body.get("output_format") not in (None, "png"):
        raise ApiError(400, "unsupported_value", "output_format: only png is produced", "output_format")
    if body.get("stream") not in (None, False):
        raise ApiError(400, "unsupported_value", "stream: streaming is not supported here; use /v1/runs/{id}/events",
                       "stream")
    if body.get("partial_images") not in (None, 0):
        raise ApiError(400, "unsupported_value", "partial_images: not supported", "partial_images")
    size = body.get("size")
    size_given = size not in (None, "auto")
    if size_given:
        match = SIZE.match(size) if isinstance(size, str) else None
        if match is None:
            raise ApiError(400, "invalid_param", f"size must be WIDTHxHEIGHT (e.g. 512x512) or auto, got {size!r}", "size")
        for name in ("width", "height"):
            if name in extra:
                raise ApiError(400, "invalid_param", f"give either size or {name}, not both", name)
        extra["width"], extra["height"] = int(match.group(1)), int(match.group(2))
    seed = extra.pop("seed", None)
    if seed is None:
        seed = (rng or random).randrange(0, 2**31)
    elif not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
        raise ApiError(400, "invalid_param", f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}", "seed")
    params = [{**extra, "prompt": prompt, "seed": (seed + i) % (MAX_SEED + 1)} for i in range(n)]
    return ImagesRequest(workflow, params, size_given)
