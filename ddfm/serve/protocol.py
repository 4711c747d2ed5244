"""OpenAI's request and response bodies as pydantic models (validation and OpenAPI for free).

Requests mirror OpenAI's chat-completions and legacy completions APIs field by field;
what a field accepts (types, ranges) is checked here, and what depends on the server
(the model id, the token limits, the image policy) is checked by the endpoint handlers
(:mod:`ddfm.serve.chat`, :mod:`ddfm.serve.completions`). Unknown fields are accepted
and ignored (and forwarded unchanged in gateway mode), as vLLM does, so clients that
send extra options still work. Responses carry one extension field, ``ddfm`` (see
:class:`Routing`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StrictBool, StrictInt, StrictStr, Tag, field_validator
from pydantic_core import PydanticCustomError

__all__ = ["ChatCompletionRequest", "CompletionRequest", "ChatMessage", "Routing", "Usage", "ChatCompletion",
           "ChatCompletionChunk", "Completion", "CompletionChunk", "ChatLogprobs", "CompletionLogprobs", "ModelList"]

MAX_STOP = 4  # OpenAI: up to 4 stop sequences


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


def _one_choice(cls, n: Optional[int], info) -> Optional[int]:
    if n is not None and n != 1:
        raise PydanticCustomError("unsupported_value", "'{field}' must be 1 (one choice per prompt), got {n}",
                                  {"field": info.field_name, "n": n})
    return n


def _stop_list(stop: Union[str, list[str], None]) -> list[str]:
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if not all(stop):
        raise PydanticCustomError("invalid_value", "stop sequences must be non-empty strings")
    if len(stop) > MAX_STOP:
        raise PydanticCustomError("invalid_value", "'stop' has {n} sequences; at most {m}", {"n": len(stop), "m": MAX_STOP})
    return stop


class StreamOptions(_Request):
    include_usage: StrictBool = False


class _Sampling(_Request):
    """The generation options both APIs share."""

    model: StrictStr = Field(min_length=1, description="the model id (GET /v1/models)")
    temperature: Optional[float] = Field(None, ge=0, le=2, strict=True, description="0 = greedy (default 1)")
    top_p: Optional[float] = Field(None, gt=0, le=1, strict=True)
    n: Optional[StrictInt] = Field(None, description="must be 1")
    stop: Union[StrictStr, list[StrictStr], None] = Field(None, description=f"up to {MAX_STOP} strings")
    seed: Optional[StrictInt] = Field(None, ge=0, lt=2**63, description="same seed, same text (alone or batched)")
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None

    _n = field_validator("n")(classmethod(_one_choice))

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        return _stop_list(stop)


# ----------------------------------------------------------------------------- chat

class ImageURL(_Request):
    url: StrictStr = Field(description="data:image/...;base64,... (http(s):// and paths only when enabled)")
    detail: Optional[str] = None


class TextPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: Union[ImageURL, StrictStr]

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


def _shape(value: Any) -> Optional[str]:
    """Which member of a string-or-list union a value is meant for (so that a bad value
    gets one error, about that member, instead of one per member)."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        first = value[0] if value else None
        return {int: "ids", list: "batch", str: "texts"}.get(type(first), "parts")
    return None


Content = Annotated[Union[Annotated[StrictStr, Tag("text")], Annotated[list[ContentPart], Tag("parts")]],
                    Discriminator(_shape, custom_error_type="invalid_type",
                                  custom_error_message="must be a string or an array of content parts")]


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Content] = None


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, ge=1)
    max_completion_tokens: Optional[StrictInt] = Field(None, ge=1, description="wins over max_tokens")
    logprobs: Optional[StrictBool] = Field(False, description="log-probabilities of the ensemble's mixture")
    top_logprobs: Optional[StrictInt] = Field(None, ge=0, le=20, description="with logprobs: alternatives per token")


# ----------------------------------------------------------------------------- completions

Prompt = Annotated[Union[Annotated[StrictStr, Tag("text")], Annotated[list[StrictStr], Tag("texts")],
                         Annotated[list[StrictInt], Tag("ids")], Annotated[list[list[StrictInt]], Tag("batch")]],
                   Discriminator(lambda v: "texts" if _shape(v) == "parts" else _shape(v),
                                 custom_error_type="invalid_type", custom_error_message="must be a string, a list "
                                 "of strings, a list of token ids or a list of token-id lists")]


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (OpenAI's legacy API: what lm-evaluation-harness drives)."""

    prompt: Prompt = Field(description="a string, a list of strings, a token-id list or a list of token-id lists")
    max_tokens: Optional[StrictInt] = Field(None, ge=0, description="default 16; 0 only with echo (prompt scoring)")
    echo: Optional[StrictBool] = Field(False, description="return the prompt (and its log-probabilities) too")
    logprobs: Optional[StrictInt] = Field(None, ge=0, le=5, description="log-probabilities of the ensemble's mixture "
                                          "and this many alternatives per token")
    best_of: Optional[StrictInt] = Field(None, description="must be 1")
    suffix: Optional[str] = Field(None, description="not supported")

    _best_of = field_validator("best_of")(classmethod(_one_choice))

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, prompt):
        if isinstance(prompt, list) and not prompt:
            raise PydanticCustomError("invalid_value", "'prompt' must not be an empty list")
        if isinstance(prompt, list) and any(isinstance(p, list) and not p for p in prompt):
            raise PydanticCustomError("invalid_value", "a token-id prompt must not be empty")
        return prompt

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, suffix):
        if suffix:
            raise PydanticCustomError("unsupported_value", "'suffix' (insertion) is not supported")
        return suffix

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list: one string or token-id list per choice."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


# ----------------------------------------------------------------------------- responses

class Routing(BaseModel):
    """The ``ddfm`` extension field: how the experts were mixed for this answer.

    ``weights`` (K,) are p(S_k | z) (eq. 29 top-k renormalised, or the running posterior
    after the last token, eq. 26-27), aligned with ``experts``; ``routed_to`` are the
    experts whose weight is > 0.
    """

    model_config = ConfigDict(extra="allow")
    weights: list[float]
    experts: list[str]
    routed_to: list[str]
    mode: str


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: Optional[list[TokenLogprobEntry]] = None
    refusal: Optional[list[TokenLogprobEntry]] = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ddfm: Optional[Routing] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    ddfm: Optional[Routing] = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format; ``token_logprobs[0]`` is None for an echoed first token."""

    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: Optional[list[Optional[dict[str, float]]]] = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None
    ddfm: Optional[Routing] = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


CompletionChunk = Completion  # OpenAI streams the same object with partial text


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ddfm"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def dump(model: BaseModel) -> dict[str, Any]:
    """A response model as a JSON-ready dict. Fields at None stay (as OpenAI sends them),
    except ``ddfm`` wherever it has nothing to say (the chunks before the last)."""
    out = model.model_dump(mode="json")
    for c in out.get("choices") or []:
        if c.get("ddfm", 0) is None:
            del c["ddfm"]
    if out.get("ddfm", 0) is None:
        del out["ddfm"]
    return out
