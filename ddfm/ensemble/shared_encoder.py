"""The experts' own vision tower as the router's encoder (the paper's shared encoder, §5.1).

The tower of the first expert computes the routing features: each image's tower states
(the layer the family projects, before its projector), averaged over its tokens and tiles
(:func:`ddfm.model.families.tower_features`, the same features as ``ddfm.embed``'s
``tower:PATH`` encoder), for every family with a vision tower: LLaVA-1.5,
LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM. For LLaVA-1.5 the tower
states are also reused by every expert whose tower has identical weights (LLaVA trains
with a frozen tower): its projector runs on them, so routing adds no encoder pass. The
other families' experts run their own tower in the prefill (their image features need
the family's tiling / merging around the projector). :class:`SharedTower` serves
:class:`~ddfm.router.Router` through ``encode``.
"""

from __future__ import annotations

from typing import Any

import torch

from ddfm.ensemble.prompts import Batch, open_request_image
from ddfm.model.families import FAMILIES, tower_features, tower_of

__all__ = ["SharedTower", "tower_of"]


class SharedTower:
    spec = "shared-tower"
    modality = "image"

    def __init__(self, experts: list, processor):
        self.ref = next(m for m in experts if m is not None)
        family = FAMILIES.get(self.ref.config.model_type)
        if family is None or tower_of(self.ref) is None:
            raise ValueError(f"shared_encoder: the experts ({self.ref.config.model_type}) have no vision tower "
                             f"to route with (families with one: {', '.join(FAMILIES)})")
        self.processor, self.experts, self.family = processor, experts, family
        towers = [tower_of(m) for m in experts]
        ref_state = tower_of(self.ref).state_dict()
        self.same = [t is not None and all(torch.equal(v, ref_state[n]) for n, v in t.state_dict().items())
                     for t in towers]
        self._last: dict[int, Any] = {}
        self._vision: dict[int, dict] = {}

    def remember(self, batch: Batch) -> None:
        """Image inputs the processor already computed for the batch's images."""
        self._vision = {id(im): v for im, v in zip(batch.images, batch.vision) if im is not None and v is not None}

    def _vision_of(self, image) -> dict:
        known = self._vision.get(id(image))
        if known is not None:  # the batch's own image inputs: no second preprocessing
            return known
        return dict(self.processor.image_processor(images=[open_request_image(image)], return_tensors="pt"))

    def encode(self, items: list):
        """Routing features (B, D) float32 (numpy, CPU) of images; remembers the tower states."""
        originals = list(items)
        features, states = tower_features(self.ref.config, tower_of(self.ref), [self._vision_of(x) for x in originals])
        self._last = {id(x): states[j] for j, x in enumerate(originals)}
        return torch.nn.functional.normalize(features, dim=1).cpu().numpy()

    def outputs(self, batch: Batch) -> "SharedOutputs":
        hidden = [None] * len(batch.images)
        if self.family.reuse_tower:
            hidden = [self._last.get(id(im)) if im is not None else None for im in batch.images]
            todo = [i for i, h in enumerate(hidden) if h is None and batch.vision[i] is not None]
            if todo:  # requests the router did not see (e.g. a forced expert): one tower pass now
                _, states = tower_features(self.ref.config, tower_of(self.ref), [batch.vision[i] for i in todo])
                for i, h in zip(todo, states):
                    hidden[i] = h
        self._last, self._vision = {}, {}
        return SharedOutputs(self, hidden)


class SharedOutputs:
    def __init__(self, tower: SharedTower, hidden: list):
        self.tower, self.hidden = tower, hidden

    def for_expert(self, k: int, rows: list[int]):
        """``mm_encoder_outputs`` for expert k's rows (its own projector on the shared tower
        states), or None when its tower differs or the family's experts run their own."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        states = [self.hidden[r] for r in rows if self.hidden[r] is not None]
        if not self.tower.same[k] or not states:
            return None
        model = self.tower.experts[k]
        projector = getattr(model, "model", model).multi_modal_projector
        with torch.inference_mode():
            feats = projector(torch.stack(states).to(model.device, model.dtype))
        return {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
