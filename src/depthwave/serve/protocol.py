"""The OpenAI request bodies, read field by field: every invalid field is a 400 that names it.

A body becomes a `Job`: the prompts (token ids), one `SamplingParams`, the sampler's parameter object, and what the
response must carry (echo, logprobs, streaming, usage). Unknown fields are refused rather than ignored, so a typo
in a sampler parameter never passes silently; the sampler's own parameters come under their Python names
(`{"sampler": "diffusion", "inner_recurrence": 8}`, what the `openai` client's `extra_body` sends).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from depthwave.engine.selection import SamplingParams
from depthwave.errors import DepthwaveError
from depthwave.samplers import registry


class ApiError(Exception):
    """An error response in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(param: str, what: str, value: Any = None, shown: bool = True) -> ApiError:
    got = f", got {value!r}" if shown else ""
    return ApiError(400, f"{param} must be {what}{got}", param=param)


# Fields of both endpoints, and what each accepts. Fields OpenAI defines that depthwave cannot honour are refused
# unless they carry their neutral value.
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "stop",
    "seed",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "stop_token_ids",
    "ignore_eos",
    "sampler",
}
COMPLETION_ONLY = {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_ONLY = {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}
NEUTRAL: dict[str, Any] = {
    "n": 1,
    "best_of": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "suffix": None,
    "logit_bias": {},
}
MAX_LOGPROBS = 20


@dataclass
class Job:
    """One HTTP request's work: a request per prompt, sharing the sampling and sampler parameters."""

    prompts: list[list[int]]
    sampling: SamplingParams
    sampler: Any
    max_tokens: int = 16
    """0: nothing generated (with echo: only the prompt's logprobs)."""
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None
    """Top logprobs per token (completions: `logprobs`; chat: `top_logprobs` when `logprobs` is true)."""
    scoring_steps: int | None = None
    """Recurrences of the full-depth forward that logprobs come from (the sampler's num_steps)."""


def _int(body: dict, name: str, minimum: int, default: int | None = None) -> int | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise bad(name, f"an integer >= {minimum}", value)
    return value


def _number(body: dict, name: str, default: float, ok: Any, what: str) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise bad(name, what, value)
    return float(value)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(name, "true or false", value)
    return value


def _token_list(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    )


def parse_prompts(body: dict, encode: Any) -> list[list[int]]:
    """`prompt`: a string, token ids, or a list of either (a batch)."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [encode(prompt)]
    if _token_list(prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _token_list(p) for p in prompt):
        return [encode(p) if isinstance(p, str) else list(p) for p in prompt]
    raise bad("prompt", "a string, a list of token ids, or a non-empty list of those", prompt)


def parse_messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "a non-empty list of {role, content} objects", messages)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role", "'system', 'user' or 'assistant'", message)
        content = message.get("content")
        if isinstance(content, list):  # content parts: only text parts can be read
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad(f"messages[{i}].content", "a string or a list of text parts", content)
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content", "a string", content)
        out.append({"role": message["role"], "content": content})
    return out


def parse_sampler(body: dict, default: Any, cache_mode: str) -> Any:
    """The sampler's parameter object (through the samplers' registry): the server's default, or `sampler` with
    its parameters from the body, on the server's KV cache. Keys that are no field of the endpoint nor of the chosen
    sampler are refused before this, naming them."""
    name = body.get("sampler")
    chosen = default.name if name is None else name
    if chosen not in registry.PARAMS:
        raise bad("sampler", f"one of {sorted(registry.PARAMS)}", name)
    given = {k: v for k, v in body.items() if k in registry.field_names(chosen)}
    base = default if chosen == default.name else None
    try:
        return registry.make(chosen, base=base, engine_cache=cache_mode, **given)
    except DepthwaveError as exc:
        field = next((k for k in given if str(exc).startswith(k)), None)
        raise ApiError(400, str(exc), param=field) from None


def check_fields(body: dict, allowed: set[str], sampler_fields: set[str]) -> None:
    for key in body:
        if key not in allowed and key not in sampler_fields:
            other = key in registry.every_field()
            hint = " (a parameter of another sampler: choose it with 'sampler')" if other else ""
            raise ApiError(400, f"unknown field {key!r}{hint}", param=key)
    for key, neutral in NEUTRAL.items():
        if key in body and body[key] not in (neutral, None):
            raise ApiError(400, f"{key} must be {neutral!r} (not supported otherwise), got {body[key]!r}", param=key)


def parse_sampling(body: dict, max_tokens_key: str, default_max_tokens: int) -> SamplingParams:
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str) and stop:
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) and s for s in stop):
        stops = tuple(stop)
    else:
        raise bad("stop", "a non-empty string or a list of them", stop)
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in stop_ids
    ):
        raise bad("stop_token_ids", "a list of token ids", stop_ids)
    top_k = _int(body, "top_k", -1, 0)
    max_tokens = _int(body, max_tokens_key, 0, default_max_tokens)
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise bad("stream_options", "an object", stream_options)
    try:
        return SamplingParams(
            temperature=_number(body, "temperature", 1.0, lambda v: v >= 0, "a number >= 0"),
            top_p=_number(body, "top_p", 1.0, lambda v: 0 < v <= 1, "in (0, 1]"),
            top_k=0 if top_k == -1 else top_k,  # type: ignore[arg-type]
            min_p=_number(body, "min_p", 0.0, lambda v: 0 <= v <= 1, "in [0, 1]"),
            repetition_penalty=_number(body, "repetition_penalty", 1.0, lambda v: v > 0, "> 0"),
            max_new_tokens=max(max_tokens or 0, 1),  # 0 (echo only) generates nothing: see Job.max_tokens
            stop=stops,
            stop_token_ids=tuple(stop_ids),
            ignore_eos=_bool(body, "ignore_eos"),
            seed=_int(body, "seed", 0),
        )
    except DepthwaveError as exc:
        raise ApiError(400, str(exc), param=str(exc).split(" ")[0]) from None


@dataclass(frozen=True)
class Context:
    """What parsing needs from the server: the served name, the default sampler, the KV cache mode, the
    tokenizer's encode and chat template."""

    model_name: str
    default_sampler: Any
    cache_mode: str
    encode: Any
    chat: Any


def _check_model(body: dict, ctx: Context) -> None:
    model = body.get("model")
    if model is not None and model != ctx.model_name:
        raise ApiError(
            404,
            f"model {model!r} does not exist; this server serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _sampler_fields(body: dict, ctx: Context) -> set[str]:
    name = body.get("sampler") or ctx.default_sampler.name
    return set(registry.field_names(name)) if name in registry.PARAMS else set()


def _streaming(body: dict) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise bad("stream_options", "an object with include_usage", options)
    return stream, _bool(options, "include_usage") and stream


def parse_completion(body: Any, ctx: Context) -> Job:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(body, ctx)
    check_fields(body, COMMON | COMPLETION_ONLY, _sampler_fields(body, ctx))
    stream, usage = _streaming(body)
    echo = _bool(body, "echo")
    logprobs = _int(body, "logprobs", 0)
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad("logprobs", f"an integer from 0 to {MAX_LOGPROBS}", logprobs)
    max_tokens = _int(body, "max_tokens", 0, 16)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "at least 1 unless echo is true", 0)
    sampler = parse_sampler(body, ctx.default_sampler, ctx.cache_mode)
    return Job(
        prompts=parse_prompts(body, ctx.encode),
        sampling=parse_sampling(body, "max_tokens", 16),
        sampler=sampler,
        max_tokens=max_tokens,  # type: ignore[arg-type]
        stream=stream,
        include_usage=usage,
        echo=echo,
        logprobs=logprobs,
        scoring_steps=getattr(sampler, "num_steps", None),
    )


def parse_chat(body: Any, ctx: Context) -> Job:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    _check_model(body, ctx)
    check_fields(body, COMMON | CHAT_ONLY, _sampler_fields(body, ctx))
    stream, usage = _streaming(body)
    messages = parse_messages(body)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key, 1, 256)
    top = _int(body, "top_logprobs", 0)
    if top is not None and top > MAX_LOGPROBS:
        raise bad("top_logprobs", f"an integer from 0 to {MAX_LOGPROBS}", top)
    wants = _bool(body, "logprobs")
    if top and not wants:
        raise bad("logprobs", "true when top_logprobs is given", body.get("logprobs"))
    sampler = parse_sampler(body, ctx.default_sampler, ctx.cache_mode)
    try:
        prompt = ctx.chat(messages)
    except DepthwaveError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    return Job(
        prompts=[prompt],
        sampling=parse_sampling(body, key, 256),
        sampler=sampler,
        max_tokens=max_tokens,  # type: ignore[arg-type]
        stream=stream,
        include_usage=usage,
        logprobs=(top or 0) if wants else None,
        scoring_steps=getattr(sampler, "num_steps", None),
    )
