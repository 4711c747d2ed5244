"""Every VLM family ddfm supports, end to end on real images, in the default environment.

Tiny random-weight checkpoints of LLaVA-1.5, LLaVA-OneVision, InternVL, Qwen2-VL,
Qwen2.5-VL, Idefics3 and SmolVLM are built offline (``helpers/checkpoints.py``: the
family's transformers config and model class, a BPE tokenizer trained here, the family's
image processor and processor class, a chat template in the family's format). The
images are real: Fashion-MNIST at 28x28 and scikit-learn digits at 56x28, so every family
with dynamic resolution (tiles, grids, anyres) gives the two kinds a different number of
image tokens.

Fast tests: the parts each ``--train`` recipe trains, and our masked labels against the
family's own ``apply_chat_template`` output (ids from the processor, answer spans found
independently from the family's role markers). The slow test per family runs every
stage: ``init --from``, ``train`` with each recipe, ``embed tower:``, ``partition``, the
ensemble with the shared-encoder router (token for token against the family's own
``generate``, batched with left padding), rows joining a running batch, ``eval`` and
``serve`` (a real server on loopback).
"""

import json
from pathlib import Path

import pytest
import torch
from helpers import checkpoints
from helpers.checkpoints import conversations, hf_messages
from helpers.servers import LiveServer

from ddfm.data import load_records, open_image
from ddfm.model.chat import encode_conversation, expand_image
from ddfm.model.checkpoint import load_model
from ddfm.model.families import FAMILIES, family_of, part_of, tower_of

NAMES = list(checkpoints.FAMILIES)

# each family's answer markers, written from its chat template: an answer starts after
# HEADER and ends with END (included: the model learns to stop)
MARKERS = {
    "llava": (" ASSISTANT:", "</s>"),
    "llava_onevision": ("<|im_start|>assistant ", "<|im_end|>"),
    "internvl": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    "qwen2_vl": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    "qwen2_5_vl": ("<|im_start|>assistant\n", "<|im_end|>\n"),
    "idefics3": ("Assistant:", "<end_of_utterance>\n"),
    "smolvlm": ("Assistant:", "<end_of_utterance>\n"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data(family_data):
    return family_data


def checkpoint(family: str, data) -> Path:
    return checkpoints.built(family, data)


def _find(seq: list[int], sub: list[int], start: int = 0) -> int:
    for i in range(start, len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return -1


def expected_mask(family: str, tokenizer, ids: list[int]) -> list[bool]:
    """The answer tokens of a rendered conversation, found from the family's markers."""
    header, end = (tokenizer(x, add_special_tokens=False)["input_ids"] for x in MARKERS[family])
    mask, i = [False] * len(ids), 0
    while (i := _find(ids, header, i)) >= 0:
        start = i + len(header)
        stop = _find(ids, end, start)
        assert stop >= 0, "an answer without its end marker"
        for j in range(start, stop + len(end)):
            mask[j] = True
        i = stop + len(end)
    return mask


@pytest.mark.parametrize("family", NAMES)
def test_masked_labels_match_the_family_chat_template(family, data):
    """Ids = the family's processor.apply_chat_template(tokenize=True) output (each image
    expanded by the family itself), mask = the answers between the family's markers."""
    model, processor = load_model(checkpoint(family, data))
    tok = processor.tokenizer
    counts = []
    for conv, images in conversations(data):
        enc = encode_conversation(processor, conv, images)
        ref = processor.apply_chat_template(hf_messages(conv, images), tokenize=True, return_dict=True,
                                            return_tensors="pt")
        assert enc.ids == ref["input_ids"][0].tolist()
        assert enc.mask == expected_mask(family, tok, enc.ids)
        answers = [t["value"] for t in conv if t["from"] == "gpt"]
        decoded = tok.decode([t for t, m in zip(enc.ids, enc.mask) if m])
        assert all(a in decoded for a in answers) and decoded.count(MARKERS[family][1].strip()) == len(answers)
        for key in ref:
            if key not in ("input_ids", "attention_mask") and key not in enc.token_types:
                assert torch.equal(enc.vision[key], ref[key]), key
        # each image expanded once and spliced (how `ddfm train` encodes a shard): the same
        spliced = encode_conversation(processor, conv, [expand_image(processor, im) for im in images])
        assert spliced.ids == enc.ids and spliced.mask == enc.mask
        assert spliced.token_types.keys() == enc.token_types.keys()
        assert all(torch.equal(spliced.token_types[k], enc.token_types[k]) for k in enc.token_types)
        if images:
            assert spliced.vision.keys() == enc.vision.keys()
            assert all(torch.equal(spliced.vision[k], enc.vision[k]) for k in enc.vision)
        counts.append(sum(t == model.config.image_token_id for t in enc.ids))
    if family != "llava":  # dynamic resolution: the 28x28 and the 56x28 image differ
        assert counts[0] != counts[1] and counts[0] > 0 and counts[1] > 0
    assert counts[2] == 0


@pytest.mark.parametrize("family", NAMES)
def test_train_recipes_map_onto_the_family_parts(family, data):
    """Every parameter belongs to exactly one part; vision = the tower's parameters, and
    each recipe trains what it names."""
    from ddfm.train import RECIPES, set_trainable

    model, _ = load_model(checkpoint(family, data))
    fam = family_of(model.config)
    assert fam is FAMILIES[family]
    parts = {name: part_of(fam, name) for name, _ in model.named_parameters()}
    assert None not in parts.values()
    tower = {id(p) for p in tower_of(model).parameters()}
    vision = {id(p) for name, p in model.named_parameters() if parts[name] == "vision"}
    projector = {id(p) for name, p in model.named_parameters() if parts[name] == "projector"}
    assert vision and projector and vision <= tower
    assert tower - vision == (projector & tower)  # only Qwen2-VL's merger sits in the tower module
    for recipe, trained in RECIPES.items():
        set_trainable(model, trained)
        assert all(p.requires_grad == (parts[name] in trained) for name, p in model.named_parameters()), recipe


def test_unsupported_family_is_refused_by_name():
    from transformers import AutoConfig

    config = AutoConfig.for_model("paligemma")
    with pytest.raises(ValueError, match="not a VLM family ddfm supports.*qwen2_vl"):
        family_of(config)


def test_a_template_that_cannot_be_masked_names_the_family(data):
    _, processor = load_model(checkpoint("qwen2_vl", data))
    # answers rendered with a marker the generation prompt does not have: no prefix, no markers
    processor.chat_template = processor.chat_template.replace(
        "<|im_start|>{{ message['role'] }}\n", "<|im_start|>{{ message['role'] }} turn\n")
    conv, images = conversations(data)[0]
    with pytest.raises(ValueError, match="Qwen2VL: the chat template does not render"):
        encode_conversation(processor, conv, images)


# --------------------------------------------------------------------------- end to end

def _changed_parts(init_dir: Path, out_dir: Path, family) -> set[str]:
    # compared as loaded (file keys may keep a family's original layout, e.g. LLaVA's)
    a, b = dict(load_model(init_dir)[0].named_parameters()), dict(load_model(out_dir)[0].named_parameters())
    return {part_of(family, k) for k in a if not torch.equal(a[k], b[k])}


def _requests(data):
    from ddfm.ensemble import Request

    recs = load_records(data["test"]).records
    fm = next(r for r in recs if r.id.startswith("f"))
    dg = next(r for r in recs if r.id.startswith("d"))
    return [Request("What is this?", image=str(fm.image_path)),
            Request("Which digit is this, please?", image=str(dg.image_path)),
            Request("What is 2 plus 3?")]


def _hf_generate(model, processor, requests, n: int) -> list[tuple[list[int], list[float]]]:
    """The family's own greedy generate on a left-padded batch of requests: per request
    the tokens and the log-probability of each under the model."""
    from ddfm.model.chat import render_prompt

    texts = [render_prompt(processor, [{"role": "user", "content": ([{"type": "image"}] if r.image else [])
                                        + [{"type": "text", "text": r.prompt}]}]) for r in requests]
    images = [open_image(r.image) for r in requests if r.image]
    nested = processor.image_processor.__class__.__name__.startswith(("Idefics3", "SmolVLM"))
    bos = processor.tokenizer.bos_token
    enc = processor(text=texts, images=([[im] for im in images] if nested else images) or None, padding=True,
                    padding_side="left", return_tensors="pt",
                    add_special_tokens=not (bos and texts[0].startswith(bos)))
    out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=processor.tokenizer.pad_token_id,
                         output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[:, enc["input_ids"].shape[1]:]  # (B, n)
    logp = torch.stack(out.logits, 1).float().log_softmax(-1)  # (B, n, V)
    chosen = logp.gather(-1, tokens[..., None])[..., 0]
    return [(t.tolist(), lp.tolist()) for t, lp in zip(tokens, chosen)]


def _same_tokens(ours, theirs: tuple[list[int], list[float]], eos: set[int]):
    """Same greedy tokens, and the same log-probability of each (positions included: an
    M-RoPE family decoded with 1-D positions keeps its argmax here but not its numbers)."""
    tokens, logps = theirs
    n = len(ours.token_ids)
    assert ours.token_ids == tokens[:n]
    assert [x["logprob"] for x in ours.logprobs] == pytest.approx(logps[:n], abs=1e-5)
    if ours.finish_reason == "stop":
        assert ours.token_ids[-1] in eos


@pytest.mark.slow
@pytest.mark.parametrize("family", NAMES)
def test_family_end_to_end(family, data, tmp_path):
    """init --from, train (each recipe), embed tower:, partition, generate (shared-encoder
    router; token for token against the family's generate), rows joining, eval, serve."""
    import httpx

    from ddfm.embed import EmbedConfig, embed
    from ddfm.ensemble import DecodeBatch, Ensemble, EnsembleConfig, Sampling
    from ddfm.evaluate import EvalConfig, evaluate_cli
    from ddfm.init import InitConfig, init
    from ddfm.partition import PartitionConfig, partition
    from ddfm.serve import ServeConfig, create_app
    from ddfm.train import RECIPES, TrainConfig, train

    source = checkpoint(family, data)
    fam = FAMILIES[family]
    # init --from: the checkpoint's own files, linked, plus ddfm.json
    init_dir = init(InitConfig(from_dir=str(source), out=str(tmp_path / "init")))
    assert (init_dir / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert json.loads((init_dir / "ddfm.json").read_text())["family"] == fam.name
    # train: each recipe changes exactly its parts
    runs = {}
    for recipe, parts in RECIPES.items():
        runs[recipe] = train(TrainConfig(init=str(init_dir), data=str(data["train"]), out=str(tmp_path / recipe),
                                         steps=2, batch_size=4, lr=1e-2, warmup=0, save_every=0, device="cpu",
                                         train=recipe))
        assert _changed_parts(init_dir, runs[recipe], fam) == set(parts), recipe
    experts = [str(runs["llava"]), str(runs["internvl"])]
    # the shared-encoder router: the initial checkpoint's tower embeds, k-means partitions
    feats = embed(EmbedConfig(data=[str(data["train"])], encoder=f"tower:{init_dir}", out=str(tmp_path / "embed")))
    part = partition(PartitionConfig(data=str(data["train"]), features=str(feats), k=2, out=str(tmp_path / "part")))
    requests = _requests(data)
    plain = [load_model(e) for e in experts]
    eos = {plain[0][1].tokenizer.eos_token_id}
    # top-1 routing with the experts' own tower: each request decodes as its expert alone
    routed = Ensemble.from_pretrained(experts, part / "router.json", mode="centroid", top_k=1, shared_encoder=True)
    gens = routed.generate(requests, max_new_tokens=6, logprobs=0)
    # expert 0 (the llava recipe) kept the initial tower: its features are embed's tower: features
    from ddfm.router import Router

    images = [r.image for r in requests[:2]]
    assert routed.route(requests[:2]).numpy() == pytest.approx(Router.load(part).route(images).numpy(), abs=1e-5)
    for req, gen in zip(requests, gens):
        k = max(range(2), key=lambda j: gen.weights[j])
        _same_tokens(gen, _hf_generate(*plain[k], [req], 6)[0], eos)
    # one expert, the whole batch: left padding against the family's batched generate
    forced = Ensemble.from_pretrained(experts, mode="expert:0")
    gens = forced.generate(requests, max_new_tokens=6, logprobs=0)
    for gen, ref in zip(gens[:2], _hf_generate(*plain[0], requests[:2], 6)):
        _same_tokens(gen, ref, eos)
    _same_tokens(gens[2], _hf_generate(*plain[0], requests[2:], 6)[0], eos)
    # rows join a running batch (caches of other lengths) and decode as alone
    batch = DecodeBatch(forced)
    handles = batch.add(requests[:1], [Sampling(max_new_tokens=6)])
    batch.step()
    batch.step()
    handles += batch.add(requests[1:], [Sampling(max_new_tokens=6)] * 2)
    while len(batch):
        batch.step()
    assert [batch.result(h).token_ids for h in handles] == [g.token_ids for g in gens]
    # eval and serve
    ens_cfg = EnsembleConfig(experts=experts, router=str(part / "router.json"), shared_encoder=True)
    result = evaluate_cli(EvalConfig(data=str(data["test"]), ensemble=ens_cfg, out=str(tmp_path / "eval"), limit=6,
                                 max_new_tokens=4))
    report = json.loads((Path(result) / "eval.json").read_text())
    assert report["overall"]["n"] == 6 and report["overall"]["nll_per_token"] > 0
    live = LiveServer(create_app(ServeConfig(ensemble=ens_cfg, max_output_tokens=8, default_max_tokens=6,
                                             log_level="warning"), ensemble=routed))
    try:
        import base64
        import io

        buf = io.BytesIO()
        open_image(requests[1].image).save(buf, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        body = {"model": "ddfm", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "text", "text": requests[1].prompt}, {"type": "image_url", "image_url": {"url": url}}]}]}
        resp = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        direct = routed.generate(requests[1:2], max_new_tokens=6)[0]
        assert resp.json()["choices"][0]["message"]["content"] == direct.text
        assert resp.json()["usage"]["prompt_tokens"] == direct.prompt_tokens
    finally:
        live.close()
