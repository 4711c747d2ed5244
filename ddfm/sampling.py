"""How one request is decoded: the one :class:`Sampling` of ``generate``, ``eval``, ``serve`` and the API.

    ens.generate(requests, Sampling(max_new_tokens=16, do_sample=True, temperature=0.7, seed=0))
    ens.generate(requests, max_new_tokens=16)     # fields as keywords override the default Sampling

``ddfm generate`` includes it as its options (``--max-new-tokens``, ``--do-sample``,
``--temperature``, ``--top-p``, ``--seed``, ``--stop``); the server builds one per request
from the OpenAI fields. :data:`MAX_NEW_TOKENS` is the one default length; ``ddfm eval``
chooses its own (its answers are a few words), named in :class:`ddfm.evaluate.EvalConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

from ddfm.config import arg

__all__ = ["MAX_NEW_TOKENS", "Sampling"]

MAX_NEW_TOKENS = 64


@dataclass
class Sampling:
    """One request's generation parameters (its own, whatever else shares the batch).

    ``stop``: strings (the text is cut before them) and/or token ids; eos always stops.
    ``logprobs``: None for none, N >= 0 for the chosen token's mixture log-probability
    and the N most likely tokens at every step.
    """

    max_new_tokens: int = arg("maximum generated tokens", default=MAX_NEW_TOKENS)
    do_sample: bool = arg("sample instead of greedy decoding", default=False)
    temperature: float = arg("sampling temperature of the tokens (the router's is --router-temperature)",
                             default=1.0)
    top_p: float = arg("nucleus sampling mass", default=1.0)
    seed: Optional[int] = arg("sampling seed (the same request and seed give the same text in any batch)",
                              default=None)
    stop: list[Union[str, int]] = arg("stop strings (token ids too, from the Python API)", default_factory=list,
                                      type=str)
    logprobs: Optional[int] = arg("log-probabilities of the chosen token and the N most likely at every step",
                                  default=None)

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.logprobs is not None and self.logprobs < 0:
            raise ValueError(f"logprobs must be >= 0, got {self.logprobs}")
        self.stop = list(self.stop or [])

    def override(self, **fields: Any) -> "Sampling":
        """A copy with ``fields`` replaced (unknown names are an error naming them)."""
        unknown = set(fields) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **fields) if fields else self
