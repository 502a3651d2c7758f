"""The OpenAI request and response bodies as pydantic models (FastAPI validates requests against them and
documents both in /openapi.json), and how a validated request becomes a `Job`.

Every invalid field is a 400 in OpenAI's error shape naming the field in `param` (`api_error` turns pydantic's
errors into it; FastAPI's own 422 is never sent). Unknown fields are refused rather than ignored, so a typo in a
sampler parameter never passes silently. The sampler parameters are the fields of the samplers' parameter
dataclasses (`depthwave.samplers.registry`), under their Python names (`{"sampler": "diffusion",
"inner_recurrence": 8}`, what the `openai` client's `extra_body` sends): the request models gain them here, typed
from the dataclasses and described by their help; the dataclasses check their values when the sampler is made.

A body becomes a `Job`: the prompts (token ids), one `SamplingParams`, the sampler's parameter object, and what the
response must carry (echo, logprobs, streaming, usage).
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, create_model, model_validator

from depthwave.engine.selection import TINY, SamplingParams
from depthwave.errors import DepthwaveError
from depthwave.samplers import registry

MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 64
"""More stop strings than this are refused: each is searched for in every streamed delta."""
MAX_INT = 2**63 - 1
"""Integers above this cannot reach torch (seeds) or mean nothing (budgets): refused, not a 500."""


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


def bad(param: str, what: str, value: Any = None) -> ApiError:
    return ApiError(400, f"{param} must be {what}, got {shown(value)}", param=param)


def shown(value: Any, limit: int = 80) -> str:
    """A value in an error message, cut short: a hostile body's 2 MB string is not echoed back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


# ---- pydantic's errors as OpenAI's --------------------------------------------------------------------------
TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def param_of(loc: tuple[Any, ...]) -> str | None:
    """`messages[0].role` from pydantic's location ("body", "messages", 0, "role"), without the union-member tags
    pydantic adds ("str", "list[int]", a model's class name) after the field itself."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() and part not in TYPE_TAGS and not part[:1].isupper():
            out += f".{part}" if out else part
        else:
            break
    return out or None


def api_error(errors: typing.Sequence[Any]) -> ApiError:
    """The first of a request's validation errors, as the 400 that names its field. Of the errors a union field
    gets (one per member), the one that is not about the member's type says most ("at most 64 items" rather than
    "should be a string")."""
    first = param_of(tuple(errors[0].get("loc", ())))
    same = [e for e in errors if param_of(tuple(e.get("loc", ()))) == first]
    error = next((e for e in same if not str(e.get("type", "")).endswith("_type")), errors[0])
    kind, loc = error.get("type"), tuple(error.get("loc", ()))
    if kind == "json_invalid":
        detail = (error.get("ctx") or {}).get("error", "")
        return ApiError(400, f"the request body is not valid JSON: {detail}")
    if kind == "extra_forbidden":  # the unknown key, whatever its name, ends the location
        parent, key = param_of(loc[:-1]), str(loc[-1])
        other = parent is None and key in registry.every_field()
        hint = " (a parameter of another sampler: choose it with 'sampler')" if other else ""
        name = f"{parent}.{key}" if parent else key
        return ApiError(400, f"unknown field {shown(name)}{hint}", param=name)
    param = param_of(loc)
    if param is None:
        return ApiError(400, "the request body must be a JSON object (Content-Type: application/json)")
    return ApiError(400, f"{param}: {error.get('msg', 'invalid')}, got {shown(error.get('input'))}", param=param)


# ---- request bodies -------------------------------------------------------------------------------------------
class Strict(BaseModel):
    """JSON as written: no "8" for 8, no 1 for true, no NaN; unknown fields refused. A null field that has a
    default means that default (clients send `"stop": null`, `"temperature": null`), as it always did here."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            k: v
            for k, v in data.items()
            if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None
        }


MIN_DIVISOR = TINY
"""The least temperature (but 0), repetition penalty and top_p, as `SamplingParams` checks them: the engine divides
logits by the first two and compares cumulative probabilities with the third in float32, where a far smaller
positive number (5e-324) is 0 (found by benchmarks/fuzz_serve.py); refused here too, so the schema documents it."""


def usable_temperature(value: float) -> float:
    if 0 < value < MIN_DIVISOR:
        raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_DIVISOR}")
    return value


Int = Annotated[int, Field(ge=0, le=MAX_INT)]
TokenIds = Annotated[list[Int], Field(min_length=1)]
StopText = Annotated[str, Field(min_length=1)]


class StreamOptions(Strict):
    include_usage: bool | None = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    # Other keys of a message (name, tool_calls: null, ...) are ignored, as they always were: only these are read.
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart] = Field(description="Text, or a list of text parts (joined).")


class CommonRequest(Strict):
    """Fields of both endpoints. Fields OpenAI defines that depthwave cannot honour accept only their neutral
    value."""

    model: str | None = Field(None, description="The served model's id (any other is a 404).")
    temperature: (
        Annotated[float, Field(ge=0, description="0: greedy; else at least 1e-6."), AfterValidator(usable_temperature)]
        | None
    ) = 1.0
    top_p: Annotated[float, Field(ge=MIN_DIVISOR, le=1)] | None = 1.0
    top_k: Annotated[int, Field(ge=-1, le=MAX_INT, description="-1 or 0: off.")] | None = 0
    min_p: Annotated[float, Field(ge=0, le=1)] | None = 0.0
    repetition_penalty: Annotated[float, Field(ge=MIN_DIVISOR)] | None = 1.0
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: Int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Literal[1] | None = Field(None, description="Only 1.")
    presence_penalty: Annotated[float, Field(ge=0, le=0, description="Only 0.")] | None = None
    frequency_penalty: Annotated[float, Field(ge=0, le=0, description="Only 0.")] | None = None
    logit_bias: Annotated[dict[str, float], Field(max_length=0, description="Only {}.")] | None = None
    user: str | None = None
    stop_token_ids: list[Int] | None = None
    ignore_eos: bool | None = False
    sampler: Literal[tuple(registry.PARAMS)] | None = Field(  # type: ignore[valid-type]
        None, description="The sampler of this request (default: the server's); its parameters are fields too."
    )


class CompletionFields(CommonRequest):
    prompt: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)] = Field(
        description="A string, a list of token ids, or a non-empty list of those (a batch)."
    )
    max_tokens: Annotated[int, Field(ge=0, le=MAX_INT, description="0: only with echo (prompt logprobs).")] | None = 16
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: Literal[1] | None = Field(None, description="Only 1.")
    suffix: None = Field(None, description="Not supported.")


class ChatFields(CommonRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=MAX_INT)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None


@functools.cache
def sampler_fields() -> dict[str, Any]:
    """Every sampler parameter as an optional request field: typed as its dataclass field (the union across the
    samplers that share a name), described by its help. Unset means the chosen sampler's default."""
    out: dict[str, Any] = {}
    for name, samplers in registry.every_field().items():
        types = []
        for sampler in samplers:
            hint = typing.get_type_hints(registry.PARAMS[sampler])[name]
            if hint not in types:
                types.append(hint)
        union = functools.reduce(lambda a, b: a | b, types)
        out[name] = (union | None, Field(None, description=registry.describe(name)))
    return out


def with_sampler_fields(base: type[BaseModel], name: str) -> type[BaseModel]:
    clash = set(sampler_fields()) & set(base.model_fields)
    assert not clash, f"sampler parameters shadow request fields: {clash}"
    return create_model(name, __base__=base, __doc__=base.__doc__, **sampler_fields())


if TYPE_CHECKING:  # the sampler fields are read by name, through model_fields_set
    CompletionRequest = CompletionFields
    ChatCompletionRequest = ChatFields
else:
    CompletionRequest = with_sampler_fields(CompletionFields, "CompletionRequest")
    ChatCompletionRequest = with_sampler_fields(ChatFields, "ChatCompletionRequest")


class TokenizeRequest(Strict):
    prompt: str
    add_special_tokens: bool | None = True
    model: str | None = None


class DetokenizeRequest(Strict):
    tokens: list[Int]
    model: str | None = None


# ---- response bodies ----------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "abort"]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None


class CompletionResponse(BaseModel):
    """The whole completion; with `stream`, server-sent events of the same object (object "text_completion", a
    text delta per choice) ending with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionResponse(BaseModel):
    """The whole chat completion; with `stream`, server-sent events of "chat.completion.chunk" objects (a
    `delta` per choice) ending with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    chat_template: str | None
    model_max_length: int | None


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None


class DetokenizeResponse(BaseModel):
    prompt: str


class Health(BaseModel):
    status: Literal["ok", "loading", "failed", "stopping"]
    error: str | None = None


# ---- a validated request as a Job ---------------------------------------------------------------------------
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


@dataclass(frozen=True)
class Context:
    """What parsing needs from the server: the served name, the default sampler, the KV cache mode, the
    tokenizer's encode and chat template."""

    model_name: str
    default_sampler: Any
    cache_mode: str
    encode: Any
    chat: Any


def _sampler_fields(body: dict[str, Any], ctx: Context | None) -> set[str]:
    """The parameter names of the sampler a body chooses (its `sampler`, else the server's default)."""
    name = body.get("sampler") or (ctx.default_sampler.name if ctx is not None else registry.DEFAULT_SAMPLER)
    return set(registry.field_names(name)) if name in registry.PARAMS else set()


def given(body: BaseModel) -> dict[str, Any]:
    """The fields the client sent (an explicit null included), unset ones left to their defaults."""
    return {name: getattr(body, name) for name in body.model_fields_set}


def parse_sampler(body: BaseModel, ctx: Context) -> Any:
    """The sampler's parameter object (through the samplers' registry): the server's default, or `sampler` with
    its parameters from the body, on the server's KV cache. A parameter of another sampler is refused, naming it."""
    sent = given(body)
    chosen = sent.get("sampler") or ctx.default_sampler.name
    own = _sampler_fields(sent, ctx)
    for key in sent:
        if key in registry.every_field() and key not in own:
            raise ApiError(
                400, f"unknown field {key!r} (a parameter of another sampler: choose it with 'sampler')", param=key
            )
    values = {k: v for k, v in sent.items() if k in own}
    base = ctx.default_sampler if chosen == ctx.default_sampler.name else None
    try:
        return registry.make(chosen, base=base, engine_cache=ctx.cache_mode, **values)
    except DepthwaveError as exc:
        field = next((k for k in values if str(exc).startswith(k)), None)
        raise ApiError(400, str(exc), param=field) from None


def parse_sampling(body: CommonRequest, max_tokens: int) -> SamplingParams:
    stop = body.stop
    # Never null here (`Strict.null_is_default`): these fields hold their values or their defaults.
    same = body.model_dump(include={"temperature", "top_p", "min_p", "repetition_penalty", "ignore_eos", "seed"})
    try:
        return SamplingParams(
            **same,
            top_k=max(body.top_k or 0, 0),
            max_new_tokens=max(max_tokens, 1),  # 0 (echo only) generates nothing: see Job.max_tokens
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
            stop_token_ids=tuple(body.stop_token_ids or ()),
        )
    except DepthwaveError as exc:
        raise ApiError(400, str(exc), param=str(exc).split(" ")[0]) from None


def _check_model(body: CommonRequest, ctx: Context) -> None:
    if body.model is not None and body.model != ctx.model_name:
        raise ApiError(
            404,
            f"model {shown(body.model)} does not exist; this server serves {ctx.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _streaming(body: CommonRequest) -> tuple[bool, bool]:
    stream = bool(body.stream)
    include_usage = body.stream_options is not None and bool(body.stream_options.include_usage)
    return stream, include_usage and stream


def parse_prompts(prompt: Any, encode: Any) -> list[list[int]]:
    """`prompt`: a string, token ids, or a list of either (a batch); validated by the model already."""
    if isinstance(prompt, str):
        return [encode(prompt)]
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [encode(p) if isinstance(p, str) else list(p) for p in prompt]


def parse_completion(body: CompletionFields, ctx: Context) -> Job:
    _check_model(body, ctx)
    stream, usage = _streaming(body)
    max_tokens, echo = body.max_tokens, bool(body.echo)
    assert max_tokens is not None  # a null max_tokens is its default (Strict.null_is_default)
    if max_tokens == 0 and not echo:
        raise bad("max_tokens", "at least 1 unless echo is true", 0)
    sampler = parse_sampler(body, ctx)
    return Job(
        prompts=parse_prompts(body.prompt, ctx.encode),
        sampling=parse_sampling(body, max_tokens),
        sampler=sampler,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=usage,
        echo=echo,
        logprobs=body.logprobs,
        scoring_steps=getattr(sampler, "num_steps", None),
    )


def parse_messages(body: ChatFields) -> list[dict[str, str]]:
    out = []
    for message in body.messages:
        content = message.content
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        out.append({"role": message.role, "content": text})
    return out


def parse_chat(body: ChatFields, ctx: Context) -> Job:
    _check_model(body, ctx)
    stream, usage = _streaming(body)
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    top = body.top_logprobs
    if top and not body.logprobs:
        raise bad("logprobs", "true when top_logprobs is given", body.logprobs)
    sampler = parse_sampler(body, ctx)
    try:
        prompt = ctx.chat(parse_messages(body))
    except DepthwaveError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    return Job(
        prompts=[prompt],
        sampling=parse_sampling(body, max_tokens),
        sampler=sampler,
        max_tokens=max_tokens,
        stream=stream,
        include_usage=usage,
        logprobs=(top or 0) if body.logprobs else None,
        scoring_steps=getattr(sampler, "num_steps", None),
    )
