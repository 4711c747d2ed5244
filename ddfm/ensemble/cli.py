"""``ddfm generate``: one prompt (and image) through the ensemble, from the command line."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ddfm.config import arg
from ddfm.ensemble.config import EnsembleConfig
from ddfm.ensemble.core import Ensemble
from ddfm.ensemble.decode import Generation
from ddfm.ensemble.prompts import Request
from ddfm.sampling import Sampling

__all__ = ["GenerateConfig", "generate_cli"]


@dataclass
class GenerateConfig:
    """``ddfm generate``: generate with K experts + router as one model."""

    prompt: str = arg("the user's prompt")
    ensemble: EnsembleConfig = arg("the ensemble (shared by generate, eval and serve)",
                                   default_factory=EnsembleConfig)
    image: Optional[str] = arg("image file for the prompt", default=None)
    sampling: Sampling = arg("decoding (shared by generate, eval and serve)", default_factory=Sampling)
    json: bool = arg("print the result as JSON", default=False)

    def __post_init__(self):
        if not self.ensemble.experts:
            raise ValueError("--experts: give at least one checkpoint directory")
        if self.image is not None and not Path(self.image).is_file():
            raise FileNotFoundError(f"--image: file not found: {self.image}")


def generate_cli(cfg: GenerateConfig) -> Generation:
    """Load the ensemble, generate for one prompt, print the text and the weights."""
    ens = Ensemble.from_config(cfg.ensemble)
    [gen] = ens.generate(Request(cfg.prompt, image=cfg.image), cfg.sampling)
    if cfg.json:
        print(json.dumps({**asdict(gen), "mode": ens.mode, "top_k": ens.top_k}, ensure_ascii=False))
    else:
        print(gen.text)
        weights = "  ".join(f"{n}={w:.3f}" for n, w in zip(gen.experts, gen.weights))
        print(f"[mode {ens.mode}, top-{ens.top_k}, weights {weights}, {gen.completion_tokens} tokens, "
              f"{gen.finish_reason}" + (f", left out: {', '.join(gen.left_out)}" if gen.left_out else "") + "]")
    return gen
