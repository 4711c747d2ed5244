"""ddfm's images-only processors against the families' full processors (``make test-full``).

The processors of LLaVA-OneVision, InternVL, Qwen2-VL, Qwen2.5-VL and SmolVLM carry a video
processor that needs torchvision, which the default environment does not have; ddfm builds
them without it (``ddfm.model.families.images_only``). This file runs where torchvision is
installed (``make venv-full``: PyPI's torch + torchvision) and is skipped elsewhere. For
each such family it saves a checkpoint with the family's *full* processor (video
processor and its config included, as a released checkpoint has it) and checks that

* ``AutoProcessor.from_pretrained`` (plain transformers, full processor) and ddfm's
  ``load_processor`` give the same token ids and the same image inputs for the same
  conversation (images of two sizes), with the PIL backend exactly and with the
  torchvision backend to resampling precision (0.01; measured 2e-7, SmolVLM 0.008);
* a checkpoint written by ``ddfm train`` from it still loads with ``AutoProcessor`` (its
  processor files are the initial checkpoint's, video settings included).
"""

from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision", reason="the full processors need torchvision: make venv-full / make test-full")

from helpers import checkpoints  # noqa: E402
from helpers.checkpoints import conversations, hf_messages  # noqa: E402

from ddfm.model.chat import encode_conversation  # noqa: E402
from ddfm.model.families import load_processor, processor_class  # noqa: E402

VIDEO = ["llava_onevision", "internvl", "qwen2_vl", "qwen2_5_vl", "smolvlm"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return checkpoints.family_data(tmp_path_factory.mktemp("families-full"))


def full_checkpoint(family: str, data, out: Path) -> Path:
    """The tiny checkpoint, saved again with the family's full processor (+ video processor)."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.video_processing_auto import VIDEO_PROCESSOR_MAPPING_NAMES

    path = checkpoints.build(family, data["records"], out)
    config = AutoConfig.from_pretrained(path)
    images_only = load_processor(path, config)
    name = VIDEO_PROCESSOR_MAPPING_NAMES[config.model_type]
    video = getattr(transformers, name["torchvision"] if isinstance(name, dict) else name)()
    cls = processor_class(config)
    options = {k: v for k, v in images_only.to_dict().items()
               if k not in ("image_processor", "tokenizer", "processor_class", "chat_template")}
    full = cls(image_processor=images_only.image_processor, tokenizer=images_only.tokenizer, video_processor=video,
               chat_template=images_only.chat_template, **options)
    full.save_pretrained(path)
    assert (path / "processor_config.json").is_file()
    return path


@pytest.mark.parametrize("family", VIDEO)
def test_images_only_processor_matches_the_full_processor(family, data, tmp_path):
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor

    path = full_checkpoint(family, data, tmp_path / family)
    ours = load_processor(path, AutoConfig.from_pretrained(path))
    assert not hasattr(ours, "video_processor") and getattr(ours, "images_only", False)
    # torchvision resizes a little differently: 2e-7 here, SmolVLM 0.008 (one 8-bit level)
    for backend, atol in (("pil", 0.0), ("torchvision", 0.01)):
        full = AutoProcessor.from_pretrained(path)  # video processor: torchvision
        assert hasattr(full, "video_processor")
        if backend == "pil":  # the image processor on the backend ddfm uses: exact
            full.image_processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        assert backend in type(full.image_processor).__name__.lower() or backend == "torchvision"
        for conv, images in conversations(data):
            enc = encode_conversation(ours, conv, images)
            ref = full.apply_chat_template(hf_messages(conv, images), tokenize=True, return_dict=True,
                                           return_tensors="pt")
            assert enc.ids == ref["input_ids"][0].tolist(), backend
            for key, value in (enc.vision or {}).items():
                assert torch.allclose(value.float(), ref[key].float(), atol=atol), (backend, key)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_trained_checkpoint_keeps_the_full_processor(family, data, tmp_path):
    from transformers import AutoProcessor

    from ddfm.init import InitConfig, init
    from ddfm.train import TrainConfig, train

    source = full_checkpoint(family, data, tmp_path / "hf")
    init_dir = init(InitConfig(from_dir=str(source), out=str(tmp_path / "init")))
    out = train(TrainConfig(init=str(init_dir), data=str(data["train"]), out=str(tmp_path / "expert"), steps=1,
                            batch_size=2, save_every=0, device="cpu"))
    processor = AutoProcessor.from_pretrained(out)
    assert hasattr(processor, "video_processor")
    for name in ("processor_config.json", "chat_template.jinja", "tokenizer.json"):
        if (source / name).is_file():
            assert (out / name).read_bytes() == (source / name).read_bytes(), name


@pytest.mark.parametrize("family", ["llava", "idefics3"])
def test_processors_without_a_video_processor_use_the_pil_backend_here_too(family, data, tmp_path):
    """Where torchvision is installed AutoProcessor would pick its image backend; ddfm keeps
    PIL, so experts encode images the same in both environments."""
    from transformers import AutoConfig

    path = checkpoints.build(family, data["records"], tmp_path / family)
    processor = load_processor(path, AutoConfig.from_pretrained(path))
    assert type(processor.image_processor).__name__.endswith("Pil")
