"""The experts' own vision tower as the router's encoder (the paper's shared encoder, §5.1).

The tower of the first expert computes the routing features (mean-pooled selected layer,
CLS dropped, as ``ddfm.embed``'s ``tower:PATH`` encoder) and its hidden states are reused
by every expert whose tower has identical weights (LLaVA trains with a frozen tower), so
routing adds no encoder pass. :class:`SharedTower` serves :class:`~ddfm.router.Router`
through ``encode``.
"""

from __future__ import annotations

from typing import Any

import torch

from ddfm.ensemble.prompts import Batch, open_request_image

__all__ = ["SharedTower", "tower_of"]


def tower_of(model):
    """The vision tower module of a VLM (``None`` for a text-only model or a left-out expert)."""
    if model is None:
        return None
    inner = getattr(model, "model", model)
    return getattr(inner, "vision_tower", None)


class SharedTower:
    spec = "shared-tower"
    modality = "image"

    def __init__(self, experts: list, processor):
        self.ref = next(m for m in experts if m is not None)
        if getattr(self.ref.config, "vision_config", None) is None or tower_of(self.ref) is None:
            raise ValueError("shared_encoder: the experts have no vision tower")
        self.processor, self.experts = processor, experts
        towers = [tower_of(m) for m in experts]
        ref_state = tower_of(self.ref).state_dict()
        self.same = [t is not None and all(torch.equal(v, ref_state[n]) for n, v in t.state_dict().items())
                     for t in towers]
        self._last: dict[int, Any] = {}
        self._pixels: dict[int, torch.Tensor] = {}

    def remember(self, batch: Batch) -> None:
        """Pixel values the processor already computed for the batch's images."""
        self._pixels = {id(im): v["pixel_values"] for im, v in zip(batch.images, batch.vision)
                        if im is not None and v is not None}

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        cfg = self.ref.config
        layers = cfg.vision_feature_layer if isinstance(cfg.vision_feature_layer, (list, tuple)) else [cfg.vision_feature_layer]
        with torch.inference_mode():
            out = tower_of(self.ref)(pixel_values.to(self.ref.device, self.ref.dtype), output_hidden_states=True)
            hidden = torch.cat([out.hidden_states[i] for i in layers], dim=-1)
        return hidden[:, 1:] if cfg.vision_feature_select_strategy == "default" else hidden  # (B, T, H)

    def encode(self, items: list):
        """Routing features (B, D) float32 (numpy, CPU) of images; remembers the tower output."""
        originals = list(items)
        known = [self._pixels.get(id(x)) for x in originals]
        if all(p is not None for p in known):  # the batch's own pixel values: no second preprocessing
            pixels = torch.cat(known)
        else:
            images = [open_request_image(x) for x in originals]
            pixels = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = self._hidden(pixels)
        self._last = {id(x): hidden[j:j + 1] for j, x in enumerate(originals)}
        return torch.nn.functional.normalize(hidden.mean(1).float(), dim=1).cpu().numpy()

    def outputs(self, batch: Batch) -> "SharedOutputs":
        hidden = [self._last.get(id(im)) if im is not None else None for im in batch.images]
        todo = [i for i, h in enumerate(hidden) if h is None and batch.vision[i] is not None]
        if todo:  # requests the router did not see (e.g. a forced expert): one tower pass now
            h = self._hidden(torch.cat([batch.vision[i]["pixel_values"] for i in todo]))
            for j, i in enumerate(todo):
                hidden[i] = h[j:j + 1]
        self._last, self._pixels = {}, {}
        return SharedOutputs(self, hidden)


class SharedOutputs:
    def __init__(self, tower: SharedTower, hidden: list):
        self.tower, self.hidden = tower, hidden

    def for_expert(self, k: int, rows: list[int]):
        """``mm_encoder_outputs`` for expert k's rows (its own projector on the shared tower
        states), or None when its tower differs (it then runs its own tower)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        states = [self.hidden[r] for r in rows if self.hidden[r] is not None]
        if not self.tower.same[k] or not states:
            return None
        model = self.tower.experts[k]
        projector = getattr(model, "model", model).multi_modal_projector
        with torch.inference_mode():
            feats = projector(torch.cat(states).to(model.device))
        return {"image": BaseModelOutputWithPooling(pooler_output=list(feats))}
