"""What both completion endpoints check the same way: the model id, the token limits, and a
request's generation parameters as its own :class:`~ddfm.ensemble.Sampling`."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional

from ddfm.serve.errors import ApiError, bad

__all__ = ["check_model", "check_max_tokens", "sampling", "new_id"]


def check_model(model: str, model_ids: list[str]) -> None:
    if model not in model_ids:
        raise ApiError(404, f"model {model!r} does not exist; available: {', '.join(model_ids)}", param="model",
                       code="model_not_found")


def check_max_tokens(value: int, param: str, limit: int) -> int:
    if value > limit:
        raise bad(f"'{param}' is {value}, more than this server's limit of {limit} output tokens", param,
                  "too_many_tokens")
    return value


def sampling(body: Any, max_tokens: int, logprobs: Optional[int]):
    """The request's :class:`~ddfm.ensemble.Sampling`: temperature 0 is greedy (OpenAI's default is 1)."""
    from ddfm.ensemble import Sampling

    temperature = 1.0 if body.temperature is None else body.temperature
    return Sampling(max_new_tokens=max_tokens, do_sample=temperature > 0, temperature=temperature or 1.0,
                    top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, stop=list(body.stop or []),
                    logprobs=logprobs)


def new_id(prefix: str) -> tuple[str, int]:
    return f"{prefix}-{uuid.uuid4().hex[:24]}", int(time.time())
