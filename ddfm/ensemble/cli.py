"""``ddfm generate``: one prompt (and image) through the ensemble, from the command line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ddfm.config import arg
from ddfm.ensemble.config import EnsembleConfig
from ddfm.ensemble.decode import Generation, Sampling
from ddfm.ensemble.prompts import Request

__all__ = ["GenerateConfig", "generate_cli"]


@dataclass
class GenerateConfig:
    """``ddfm generate``: generate with K experts + router as one model."""

    prompt: str = arg("the user's prompt")
    ensemble: EnsembleConfig = arg("the ensemble (shared by generate, eval and serve)",
                                   default_factory=EnsembleConfig)
    image: Optional[str] = arg("image file for the prompt", default=None)
    max_new_tokens: int = arg("maximum generated tokens", default=64)
    do_sample: bool = arg("sample instead of greedy decoding", default=False)
    temperature: float = arg("sampling temperature (of the tokens; the router's is --router-temperature)",
                             default=1.0)
    top_p: float = arg("nucleus sampling mass", default=1.0)
    seed: Optional[int] = arg("sampling seed", default=None)
    stop: list[str] = arg("stop strings", default_factory=list)
    json: bool = arg("print the result as JSON", default=False)
    sampling: Sampling = field(init=False, repr=False)

    def __post_init__(self):
        if not self.ensemble.experts:
            raise ValueError("--experts: give at least one checkpoint directory")
        self.sampling = Sampling(max_new_tokens=self.max_new_tokens, do_sample=self.do_sample,
                                 temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop)
        if self.image is not None and not Path(self.image).is_file():
            raise FileNotFoundError(f"--image: file not found: {self.image}")


def generate_cli(cfg: GenerateConfig) -> Generation:
    """Load the ensemble, generate for one prompt, print the text and the weights."""
    from ddfm.ensemble.core import Ensemble

    ens = Ensemble.from_config(cfg.ensemble)
    s = cfg.sampling
    [gen] = ens.generate(Request(cfg.prompt, image=cfg.image), max_new_tokens=s.max_new_tokens,
                         do_sample=s.do_sample, temperature=s.temperature, top_p=s.top_p, stop=s.stop or None,
                         seed=s.seed)
    if cfg.json:
        print(json.dumps({**asdict(gen), "mode": ens.mode, "top_k": ens.top_k}, ensure_ascii=False))
    else:
        print(gen.text)
        weights = "  ".join(f"{n}={w:.3f}" for n, w in zip(gen.experts, gen.weights))
        print(f"[mode {ens.mode}, top-{ens.top_k}, weights {weights}, {gen.completion_tokens} tokens, "
              f"{gen.finish_reason}" + (f", left out: {', '.join(gen.left_out)}" if gen.left_out else "") + "]")
    return gen
