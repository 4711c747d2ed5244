"""ddfm.ensemble: exactness against plain transformers, routing modes, faults, CLI.

Experts are real checkpoints written by ``ddfm init`` (two seeds of ``tiny-llava`` on the
same real images, so they share one tokenizer); the router comes from the real
``ddfm embed`` + ``ddfm partition`` stages. The slow test trains two experts with
``ddfm train`` on different real data (Fashion-MNIST vs digits).
"""

import json
import re
import shutil

import pytest
import torch
from helpers.data import make_data
from PIL import Image

from ddfm.embed import EmbedConfig, embed  # noqa: E402
from ddfm.ensemble import Ensemble, EnsembleConfig, GenerateConfig, Request  # noqa: E402
from ddfm.init import InitConfig, init
from ddfm.model.chat import render_prompt
from ddfm.model.checkpoint import load_model  # noqa: E402
from ddfm.partition import PartitionConfig, partition  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: one thread is fastest, and on a shared machine two threads can stall
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("ens")
    data = make_data(root, n_fashion=12, n_digits=12, n_text=6)
    experts = [init(InitConfig(preset="tiny-llava", data=str(data), out=str(root / f"expert-{k}"), seed=k))
               for k in range(2)]
    feats = embed(EmbedConfig(data=[str(data)], encoder="pixels@8", out=str(root / "embed")))
    part = partition(PartitionConfig(data=str(data), features=str(feats), k=2, out=str(root / "part")))
    from ddfm.router import Router

    router = Router.load(part)
    shard_image = {}  # per cluster, an image of its shard that the router sends to it
    for k in range(2):
        records = [json.loads(line) for line in (part / f"shard-{k:02d}.jsonl").read_text().splitlines()]
        paths = [str((part / r["image"]).resolve()) for r in records if r["image"]]
        shard_image[k] = next(p for p in paths if int(router.route([p])[0].argmax()) == k)
    return {"root": root, "data": data, "experts": experts, "router": part / "router.json", "image": shard_image}


@pytest.fixture(scope="module")
def plain(world):
    return [load_model(p) for p in world["experts"]]


def _inputs(proc, prompt, image=None):
    parts = ([{"type": "image"}] if image else []) + [{"type": "text", "text": prompt}]
    text = render_prompt(proc, [{"role": "user", "content": parts}])
    images = [Image.open(image).convert("RGB")] if image else None
    return proc(text=text, images=images, return_tensors="pt")


def _hf_generate(model, proc, prompt, image=None, n=10):
    enc = _inputs(proc, prompt, image)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _next_log_probs(model, proc, prompt, image=None):
    with torch.no_grad():
        return model(**_inputs(proc, prompt, image)).logits[0, -1].double().log_softmax(-1)


def _count_calls(model):
    """Batch sizes of the expert's language-model passes (prefill and every decode step
    run its decoder; decode steps may skip the wrapper's forward)."""
    calls = []

    def hook(m, args, kwargs, out):
        x = kwargs.get("input_ids")
        calls.append((x if x is not None else kwargs["inputs_embeds"]).shape[0])

    model.get_decoder().register_forward_hook(hook, with_kwargs=True)
    return calls


def test_one_expert_is_token_for_token_transformers_generate(world, plain):
    model, proc = plain[0]
    ens = Ensemble.from_pretrained([world["experts"][0]])
    assert ens.mode == "uniform" and ens.top_k == 1
    for prompt, image in [("What is this?", world["image"][0]), ("What is 2 plus 3?", None)]:
        [gen] = ens.generate(Request(prompt, image=image), max_new_tokens=10)
        assert gen.token_ids == _hf_generate(model, proc, prompt, image)
        assert gen.weights == [1.0] and gen.prompt_tokens == _inputs(proc, prompt, image)["input_ids"].shape[1]


def test_all_weight_on_expert_j_is_expert_j(world, plain):
    for j in range(2):
        model, proc = plain[j]
        ens = Ensemble.from_pretrained(world["experts"], world["router"], mode=f"expert:{j}")
        [gen] = ens.generate(Request("What is this?", image=world["image"][1 - j]), max_new_tokens=8)
        assert gen.token_ids == _hf_generate(model, proc, "What is this?", world["image"][1 - j], n=8)
        assert gen.weights == [float(j == 0), float(j == 1)]


def test_centroid_top1_batch_routes_rows_and_never_runs_zero_weight_experts(world, plain):
    ens = Ensemble.from_pretrained(world["experts"], world["router"])
    assert ens.mode == "centroid" and ens.top_k == 1
    calls = [_count_calls(m) for m in ens.experts]
    reqs = [Request("What is this?", image=world["image"][0]), Request("Which digit?", image=world["image"][1]),
            Request("What is this?", image=world["image"][0])]
    gens = ens.generate(reqs, max_new_tokens=5)
    assert [g.weights.index(1.0) for g in gens] == [0, 1, 0]
    # each expert ran only on its own rows: batch 2 for expert 0, batch 1 for expert 1
    assert set(calls[0]) == {2} and set(calls[1]) == {1} and len(calls[0]) == len(calls[1]) == 5
    for g, r in zip(gens, reqs):  # left padding and row selection change nothing
        model, proc = plain[g.weights.index(1.0)]
        assert g.token_ids == _hf_generate(model, proc, r.prompt, r.image, n=5)
    only0 = Ensemble.from_pretrained(world["experts"], world["router"])
    calls = [_count_calls(m) for m in only0.experts]
    only0.generate(Request("What is this?", image=world["image"][0]), max_new_tokens=4)
    assert len(calls[0]) == 4 and calls[1] == []


def test_mixture_next_token_distribution_is_the_explicit_sum(world, plain):
    image = world["image"][0]
    lp = torch.stack([_next_log_probs(m, p, "What is this?", image) for m, p in plain])  # (2, V)
    for mode, top_k in [("centroid", 2), ("uniform", 2)]:
        ens = Ensemble.from_pretrained(world["experts"], world["router"], mode=mode, top_k=top_k)
        probs, w = ens.next_token_distribution(Request("What is this?", image=image))
        assert torch.allclose(w, ens.route([Request("What is this?", image=image)])[0])
        explicit = (w.double().unsqueeze(1) * lp.exp()).sum(0)
        assert (probs.double() - explicit).abs().max() < 1e-6
        assert abs(float(probs.sum()) - 1) < 1e-5
    # not an average of logits
    avg_logits = torch.softmax(lp.mean(0), -1)
    assert (avg_logits - (0.5 * lp.exp()).sum(0)).abs().max() > 1e-6


def test_posterior_is_exact_bayes_over_prompt_and_generated_tokens(world, plain):
    ens = Ensemble.from_pretrained(world["experts"], world["router"], mode="posterior")
    image, prompt = world["image"][1], "Which digit is this?"
    prior = ens.route([Request(prompt, image=image)])[0].double()
    assert (prior > 0).all() and ens.top_k == 2
    [gen] = ens.generate(Request(prompt, image=image), max_new_tokens=4)
    assert gen.prior == pytest.approx(prior.tolist())
    log_w = prior.log().clone()
    for k, (model, proc) in enumerate(plain):  # log p_k(prompt text tokens) + log p_k(generated tokens)
        enc = _inputs(proc, prompt, image)
        ids = torch.cat([enc["input_ids"][0], torch.tensor(gen.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=ids[None], pixel_values=enc["pixel_values"]).logits[0].double()
        token_lp = logits[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]  # log p(x_t | x_<t), t >= 1
        log_w[k] += token_lp[ids[1:] != model.config.image_token_id].sum()
    want = torch.softmax(log_w, 0)
    got = torch.tensor(gen.weights, dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-5)
    # compare log-odds too, so a saturated posterior cannot hide an error
    assert float(got[0].log() - got[1].log()) == pytest.approx(float(log_w[0] - log_w[1]), abs=1e-2)


def test_score_is_the_mixture_log_likelihood(world, plain):
    ens = Ensemble.from_pretrained(world["experts"], world["router"], mode="uniform", top_k=2)
    image, prompt, answer = world["image"][0], "What is this?", "A coat."
    [res] = ens.score([Request(prompt, image=image)], [answer])
    model, proc = plain[0]
    full = proc(text=render_prompt(proc, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]},
                                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
                                   add_generation_prompt=False),
                images=[Image.open(image).convert("RGB")], return_tensors="pt")
    n_prompt = _inputs(proc, prompt, image)["input_ids"].shape[1]
    n = res["n_tokens"]
    assert proc.tokenizer.decode(full["input_ids"][0, n_prompt:n_prompt + n]) == answer + "</s>"
    per = []
    for m, _ in plain:
        with torch.no_grad():
            lp = m(**full).logits[0].double().log_softmax(-1)
        per.append(lp[n_prompt - 1:n_prompt - 1 + n].gather(1, full["input_ids"][0, n_prompt:n_prompt + n, None])[:, 0])
    want = -torch.logsumexp(torch.stack(per) + torch.log(torch.tensor(0.5, dtype=torch.float64)), 0).sum()
    assert res["nll"] == pytest.approx(float(want), abs=1e-4)


def test_sampling_seed_top_p_stop_and_streaming(world):
    ens = Ensemble.from_pretrained(world["experts"], world["router"], mode="uniform", top_k=2)
    req = Request("What is this?", image=world["image"][0])
    a = ens.generate(req, do_sample=True, temperature=1.5, seed=3, max_new_tokens=12)[0]
    b = ens.generate(req, do_sample=True, temperature=1.5, seed=3, max_new_tokens=12)[0]
    assert a.token_ids == b.token_ids
    greedy = ens.generate(req, max_new_tokens=12)[0]
    assert ens.generate(req, do_sample=True, top_p=1e-9, seed=5, max_new_tokens=12)[0].token_ids == greedy.token_ids
    # a stop string taken from a sampled text: cut before it, streamed deltas add up to the text
    text = a.text
    stop = text[len(text) // 2:len(text) // 2 + 2] if len(text) >= 4 else None
    deltas = []
    c = ens.generate(req, do_sample=True, temperature=1.5, seed=3, max_new_tokens=12, stop=[stop] if stop else None,
                     on_token=lambda i, d: deltas.append((i, d)))[0]
    assert "".join(d for _, d in deltas) == c.text and all(i == 0 for i, _ in deltas)
    if stop:
        assert c.finish_reason == "stop" and c.text == text[:text.find(stop)]
    first = a.token_ids[0]
    d = ens.generate(req, do_sample=True, temperature=1.5, seed=3, max_new_tokens=12, stop=[first])[0]
    assert d.token_ids == [first] and d.finish_reason == "stop"
    with pytest.raises(ValueError, match="top_p"):
        ens.generate(req, do_sample=True, top_p=0)


def test_refuses_experts_with_different_tokenizer_or_image_processing(world, tmp_path):
    other = make_data(tmp_path / "d", n_fashion=0, n_digits=0, n_text=6)
    lm = init(InitConfig(preset="tiny-lm", data=str(other), out=str(tmp_path / "lm")))
    with pytest.raises(ValueError, match="expert lm differs from expert expert-0 in its (vocabulary|special tokens)") \
            as err:
        Ensemble.from_pretrained([world["experts"][0], lm])
    # the message names each side by its expert, not "the first" / "this one"
    assert re.search(r"only in expert-0: \[.*\], only in lm: \[", str(err.value))
    odd = tmp_path / "odd"
    shutil.copytree(world["experts"][1], odd)
    pp = odd / "processor_config.json"
    cfg = json.loads(pp.read_text())
    cfg["image_processor"]["image_mean"] = [0.5, 0.5, 0.5]
    pp.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="expert odd differs from expert expert-0 in its image processor.*image_mean"):
        Ensemble.from_pretrained([world["experts"][0], odd])


def test_missing_expert_is_an_error_unless_allowed(world, plain, tmp_path):
    gone = tmp_path / "expert-gone"
    with pytest.raises(ValueError, match="expert expert-gone .* cannot be loaded.*--allow-missing"):
        Ensemble.from_pretrained([world["experts"][0], gone], world["router"])
    ens = Ensemble.from_pretrained([world["experts"][0], gone], world["router"], allow_missing=True)
    [gen] = ens.generate(Request("Which digit?", image=world["image"][1]), max_new_tokens=5)
    assert gen.left_out == ["expert-gone"] and gen.weights == [1.0, 0.0]
    assert gen.token_ids == _hf_generate(*plain[0], "Which digit?", world["image"][1], n=5)


def test_shared_encoder_routes_with_the_tower_and_runs_it_once(world, plain, tmp_path):
    feats = embed(EmbedConfig(data=[str(world["data"])], encoder=f"tower:{world['experts'][0]}",
                              out=str(tmp_path / "embed")))
    part = partition(PartitionConfig(data=str(world["data"]), features=str(feats), k=2, out=str(tmp_path / "part")))
    # give both experts the same (frozen) tower, as the LLaVA recipe trains them
    e1 = tmp_path / "expert-1"
    m0, p0 = plain[0]
    m1, _ = load_model(world["experts"][1])
    m1.model.vision_tower.load_state_dict(m0.model.vision_tower.state_dict())
    m1.save_pretrained(e1)
    p0.save_pretrained(e1)
    experts = [world["experts"][0], e1]
    reqs = [Request("What is this?", image=world["image"][k]) for k in range(2)]
    ref = Ensemble.from_pretrained(experts, part / "router.json")
    ens = Ensemble.from_pretrained(experts, part / "router.json", shared_encoder=True)
    assert torch.allclose(ens.route(reqs), ref.route(reqs))
    towers = [_count_calls_tower(m) for m in ens.experts]
    gens, ref_gens = ens.generate(reqs, max_new_tokens=6), ref.generate(reqs, max_new_tokens=6)
    assert [g.token_ids for g in gens] == [g.token_ids for g in ref_gens]
    assert sum(len(c) for c in towers) == 1  # one tower pass for routing + both experts


def _count_calls_tower(model):
    calls = []
    model.model.vision_tower.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_generate_cli_prints_text_and_weights(world, capsys):
    from ddfm.cli import main

    rc = main(["generate", "--experts", *map(str, world["experts"]), "--router", str(world["router"]),
               "--image", world["image"][1], "--prompt", "Which digit?", "--max-new-tokens", "4", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc in (0, None) and out["weights"] == [0.0, 1.0] and out["completion_tokens"] == 4
    main(["generate", "--experts", str(world["experts"][0]), "--prompt", "Hi", "--max-new-tokens", "3"])
    assert "weights expert-0=1.000" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--mode"):
        GenerateConfig(ensemble=EnsembleConfig(experts=["a"], mode="expert:3"), prompt="x")
    assert main(["generate", "--experts", "/nonexistent", "--prompt", "x"]) == 2


@pytest.mark.slow
def test_posterior_moves_toward_the_expert_whose_data_the_prompt_resembles(world, tmp_path):
    """Two experts trained with ``ddfm train`` on different real data: Fashion-MNIST vs digits."""
    from ddfm.train import TrainConfig, train

    rows = [json.loads(line) for line in world["data"].read_text().splitlines()]
    experts = []
    for source in ("fashion-mnist", "digits"):
        shard = world["data"].parent / f"only-{source}.jsonl"
        shard.write_text("".join(json.dumps(r) + "\n" for r in rows if r["source"] == source))
        experts.append(train(TrainConfig(init=str(world["experts"][0]), data=str(shard), out=str(tmp_path / source),
                                         steps=30, batch_size=8, lr=3e-3, warmup=2, save_every=0, device="cpu")))
    ens = Ensemble.from_pretrained(experts, mode="posterior")
    fashion = next(r for r in rows if r["source"] == "fashion-mnist")
    digit = next(r for r in rows if r["source"] == "digits")
    for k, record in enumerate((fashion, digit)):
        image = str(world["data"].parent / record["image"])
        # the earlier turns (an answer in the style of expert k's data) are evidence for expert k
        [gen] = ens.generate(Request("And this one?", image=image, history=record["conversations"]), max_new_tokens=4)
        assert gen.prior == [0.5, 0.5] and gen.weights[k] > 0.99
        # scoring a reference answer moves the posterior the same way
        [res] = ens.score([Request(record["conversations"][0]["value"].replace("<image>\n", ""), image=image)],
                          [record["conversations"][1]["value"]])
        assert res["weights"][k] > 0.9


def test_text_only_experts_batches_and_posterior(tmp_path):
    data = make_data(tmp_path, n_fashion=0, n_digits=0, n_text=8)
    experts = [init(InitConfig(preset="tiny-lm", data=str(data), out=str(tmp_path / f"lm-{k}"), seed=k)) for k in range(2)]
    plain = [load_model(p) for p in experts]
    prompts = ["What is 1 plus 2?", "Hi", "What is 4 plus 4? Answer in words, please."]
    one = Ensemble.from_pretrained([experts[0]])
    gens = one.generate([Request(p) for p in prompts], max_new_tokens=6)  # left-padded batch
    model, tok = plain[0]
    for g, prompt in zip(gens, prompts):
        enc = tok(render_prompt(tok, [{"role": "user", "content": prompt}]), add_special_tokens=False,
                  return_tensors="pt")
        with torch.no_grad():
            ref = model.generate(**enc, max_new_tokens=6, do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
        assert g.token_ids == ref
    with pytest.raises(ValueError, match="text-only"):
        one.generate(Request("x", image=_png(tmp_path)))
    # posterior on a text-only prompt: prior uniform, moved by each expert's prompt likelihood
    ens = Ensemble.from_pretrained(experts, mode="posterior")
    probs, w = ens.next_token_distribution(Request(prompts[0]))
    enc = tok(render_prompt(tok, [{"role": "user", "content": prompts[0]}]), add_special_tokens=False,
              return_tensors="pt")["input_ids"]
    ll, nxt = [], []
    for m, _ in plain:
        with torch.no_grad():
            lp = m(input_ids=enc).logits[0].double().log_softmax(-1)
        ll.append(lp[:-1].gather(1, enc[0, 1:, None]).sum())
        nxt.append(lp[-1])
    want_w = torch.softmax(torch.stack(ll), 0)
    assert torch.allclose(w.double(), want_w, atol=1e-5)
    assert (probs.double() - (want_w[:, None] * torch.stack(nxt).exp()).sum(0)).abs().max() < 1e-6


def _png(tmp_path):
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path)
    return str(path)


def test_posterior_answers_evidence_counts_only_the_historys_assistant_turns(world, plain):
    ens = Ensemble.from_pretrained(world["experts"], world["router"], mode="posterior", evidence="answers")
    image = world["image"][0]
    prior = ens.route([Request("What is this?", image=image)])[0].double()
    _, w = ens.next_token_distribution(Request("What is this?", image=image))
    assert torch.allclose(w.double(), prior, atol=1e-6)  # no assistant turn yet: no evidence
    history = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A coat."}]
    _, w = ens.next_token_distribution(Request("And now?", image=image, history=history))
    log_w = prior.log().clone()
    img = [Image.open(image).convert("RGB")]
    for k, (model, proc) in enumerate(plain):
        msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A coat."}]}]
        start = proc(text=render_prompt(proc, msgs[:1]), images=img, return_tensors="pt")["input_ids"].shape[1]
        full = proc(text=render_prompt(proc, msgs, add_generation_prompt=False), images=img, return_tensors="pt")
        ids = full["input_ids"][0]
        assert proc.tokenizer.decode(ids[start:]).startswith("A coat.</s>")
        with torch.no_grad():
            lp = model(**full).logits[0].double().log_softmax(-1)
        # the answer span as the training loss masks it: "A coat." + eos + the template's newline
        log_w[k] += lp[start - 1:-1].gather(1, ids[start:, None]).sum()
    assert torch.allclose(w.double(), torch.softmax(log_w, 0), atol=1e-5)
    with pytest.raises(ValueError, match="evidence"):
        Ensemble.from_pretrained(world["experts"], world["router"], mode="posterior", evidence="all")


def test_soft_mixes_every_expert_with_the_eq29_weights(world, plain):
    """``top_k="all"`` under centroid routing (the demo's "soft"): every expert runs and the
    mixture is Σ_k w_k p_k with the un-truncated weights of eq. 29; ``None`` is the router
    file's top_k (1), spelled out, not "all"."""
    image, prompt = world["image"][0], "What is this?"
    top1 = Ensemble.from_pretrained(world["experts"], world["router"])
    soft = Ensemble.from_pretrained(world["experts"], world["router"], top_k="all")
    assert top1.top_k == 1 and soft.top_k == 2
    req = Request(prompt, image=image)
    w = soft.route(req)[0]
    assert 0 < float(w.min()) and float(w.max()) < 1  # eq. 29 weights that are not one-hot here
    calls = [_count_calls(m) for m in soft.experts]
    [gen] = soft.generate(req, max_new_tokens=3)
    assert len(calls[0]) == len(calls[1]) == 3  # both experts run at every step
    assert gen.weights == pytest.approx(w.tolist())
    probs, _ = soft.next_token_distribution(req)
    lp = torch.stack([_next_log_probs(m, p, prompt, image) for m, p in plain])  # (2, V)
    assert (probs.double() - (w[:, None] * lp.exp()).sum(0)).abs().max() < 1e-6
    probs1, _ = top1.next_token_distribution(req)
    # soft is not top-1 under another name: they differ by exactly w_other * (p_other - p_top)
    top = int(w.argmax())
    diff = (w[:, None] * lp.exp()).sum(0) - lp[top].exp()
    assert diff.abs().max() > 1e-5 and ((probs - probs1).double() - diff).abs().max() < 1e-6
    with pytest.raises(ValueError, match="top-k"):
        EnsembleConfig(experts=["a"], top_k="most")
    assert EnsembleConfig(experts=["a"], top_k="ALL").top_k == "all" and EnsembleConfig(top_k="2").top_k == 2


def test_posterior_scores_every_expert_even_when_its_float32_prior_is_zero(world, plain):
    """τ = 100 and a cosine gap of 2: the float32 softmax of eq. 29 rounds expert 1's prior
    to exactly 0; the float64 log-prior (-200) keeps it, and the posterior runs it."""
    from ddfm.router import Router

    base = Router.load(world["router"])
    image, prompt = world["image"][0], "What is this?"
    f = torch.as_tensor(base.features([image]))[0]
    router = Router(torch.stack([f, -f]), temperature=100.0, encoder_spec=base.encoder_spec)
    assert float(router.probabilities(f[None].numpy())[0, 1]) == 0.0  # the float32 prior underflows
    ens = Ensemble(list(plain[i][0] for i in range(2)), plain[0][1], router, mode="posterior")
    calls = [_count_calls(m) for m in ens.experts]
    [gen] = ens.generate(Request(prompt, image=image), max_new_tokens=3)
    assert len(calls[1]) == 3  # prefill + 2 decode steps: expert 1 is scored
    log_prior = router.log_probabilities(f[None].numpy())[0]
    assert float(log_prior[1]) == pytest.approx(-200.0, abs=1e-4)
    assert gen.prior[1] > 0 and gen.weights[1] > 0
    # the exact Bayes posterior in float64, from the plain models
    log_w = log_prior.clone()
    for k, (model, proc) in enumerate(plain):
        enc = _inputs(proc, prompt, image)
        ids = torch.cat([enc["input_ids"][0], torch.tensor(gen.token_ids)])
        with torch.no_grad():
            logits = model(input_ids=ids[None], pixel_values=enc["pixel_values"]).logits[0].double()
        token_lp = logits[:-1].log_softmax(-1).gather(1, ids[1:, None])[:, 0]
        log_w[k] += token_lp[ids[1:] != model.config.image_token_id].sum()
    want = log_w - torch.logsumexp(log_w, 0)
    got = torch.tensor(gen.weights, dtype=torch.float64).log()
    assert float(got[1] - got[0]) == pytest.approx(float(want[1] - want[0]), abs=1e-2)


def test_bf16_experts_mix_on_the_cpu_in_float32(world):
    """bf16 experts: their log-probabilities come back as float32 and the weights as float64;
    every routing mode decodes and scores."""
    image = world["image"][0]
    for mode, top_k in [("centroid", 1), ("centroid", "all"), ("posterior", None)]:
        ens = Ensemble.from_pretrained(world["experts"], world["router"], mode=mode, top_k=top_k, dtype="bfloat16")
        assert all(m.dtype == torch.bfloat16 for m in ens.experts)
        [gen] = ens.generate(Request("What is this?", image=image), max_new_tokens=3, logprobs=2)
        assert gen.completion_tokens == 3 and abs(sum(gen.weights) - 1) < 1e-9
        assert all(lp["logprob"] <= 0 and len(lp["top"]) == 2 for lp in gen.logprobs)
        probs, w = ens.next_token_distribution(Request("What is this?", image=image))
        assert probs.dtype == torch.float32 and w.dtype == torch.float64
        [res] = ens.score([Request("What is this?", image=image)], ["A coat."])
        assert res["nll"] > 0 and res["n_tokens"] > 0


@pytest.mark.slow
def test_experts_from_different_inits_are_mixed_with_a_warning(world, tmp_path, caplog):
    from ddfm.ensemble.core import warn_different_inits
    from ddfm.train import TrainConfig, train

    def expert(init_dir, name):
        return train(TrainConfig(init=str(init_dir), data=str(world["data"]), out=str(tmp_path / name), steps=1,
                                 batch_size=2, save_every=0, device="cpu"))

    a, b = expert(world["experts"][0], "a"), expert(world["experts"][0], "deeper/b")
    c = expert(world["experts"][1], "c")  # same tokenizer and vocabulary, another `ddfm init`
    # same start (the init itself, or experts at other depths from it): no warning
    assert warn_different_inits(["a", "b", "init"], [a, b, world["experts"][0]]) == []
    with caplog.at_level("WARNING"):
        Ensemble.from_pretrained([a, c], mode="uniform")
    assert "experts a and c were trained from different initial checkpoints" in caplog.text


def test_score_tokens_is_the_mixture_of_every_prompt_token(tmp_path):
    """Raw prompts (the completions API's ``echo``): log p(x_t | x_<t) under the mixture for
    every token after the first, top alternatives included, in every routing mode."""
    data = make_data(tmp_path, n_fashion=0, n_digits=0, n_text=8)
    experts = [init(InitConfig(preset="tiny-lm", data=str(data), out=str(tmp_path / f"lm-{k}"), seed=k)) for k in range(2)]
    plain = [load_model(p) for p in experts]
    tok = plain[0][1]
    texts = ["The quick brown fox.", "def f(x): return x"]
    ids = [tok(t)["input_ids"] for t in texts]
    per = []  # per expert, per text: (T-1,) log p of each token and (T-1, V) log-probs
    for model, _ in plain:
        rows = []
        for x in ids:
            with torch.no_grad():
                lp = model(input_ids=torch.tensor([x])).logits[0, :-1].double().log_softmax(-1)
            rows.append((lp.gather(1, torch.tensor(x[1:])[:, None])[:, 0], lp))
        per.append(rows)
    for mode in ("uniform", "posterior"):
        ens = Ensemble.from_pretrained(experts, mode=mode)
        out = ens.score_tokens([Request(t, raw=True) for t in texts], top_logprobs=3)
        for i, (x, res) in enumerate(zip(ids, out)):
            assert res["token_ids"] == x and res["token_logprobs"][0] is None and len(res["token_logprobs"]) == len(x)
            a, b = per[0][i][0], per[1][i][0]
            if mode == "uniform":
                w = torch.full((len(x) - 1, 2), 0.5, dtype=torch.float64)
            else:  # the running posterior: the weights before token t hold the tokens before it
                cum = torch.stack([torch.cat([torch.zeros(1), a.cumsum(0)[:-1]]),
                                   torch.cat([torch.zeros(1), b.cumsum(0)[:-1]])], 1)
                w = torch.softmax(cum, 1)
            want = torch.log(w[:, 0] * a.exp() + w[:, 1] * b.exp())
            assert torch.allclose(torch.tensor(res["token_logprobs"][1:], dtype=torch.float64), want, atol=1e-5)
            mixture = torch.log(w[:, :1] * per[0][i][1].exp() + w[:, 1:] * per[1][i][1].exp())  # (T-1, V)
            best = mixture.topk(3, dim=-1)
            assert [[t for t, _ in top] for top in res["top_logprobs"][1:]] == best.indices.tolist()
        # without top_logprobs the cheaper path gives the same numbers
        cheap = ens.score_tokens([Request(t, raw=True) for t in texts])
        assert cheap[0]["top_logprobs"] is None
        assert cheap[0]["token_logprobs"][1:] == pytest.approx(out[0]["token_logprobs"][1:], abs=1e-5)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ens.score_tokens([Request("", token_ids=[1, 10**6])])
    # a raw prompt also generates without the chat template: token for token transformers' generate
    one = Ensemble.from_pretrained([experts[0]])
    [gen] = one.generate(Request(texts[0], raw=True), max_new_tokens=5)
    with torch.no_grad():
        ref = plain[0][0].generate(torch.tensor([ids[0]]), max_new_tokens=5, do_sample=False)[0, len(ids[0]):]
    assert gen.token_ids == ref.tolist()


def test_requests_join_and_leave_the_running_batch_with_their_own_parameters(world, plain):
    """Continuous batching: rows added between steps (caches of other lengths, left-padded
    and joined), with their own max_new_tokens, stop strings and sampling, decode exactly
    as each request would alone."""
    from ddfm.ensemble import DecodeBatch, Sampling

    for mode, top_k in [("centroid", 1), ("centroid", "all"), ("posterior", None)]:
        ens = Ensemble.from_pretrained(world["experts"], world["router"], mode=mode, top_k=top_k)
        reqs = [Request("What is this?", image=world["image"][0]),
                Request("Which digit is shown here, please?", image=world["image"][1]),
                Request("Tell me a long story about the item", image=world["image"][0]),
                Request("Hi")]
        params = [Sampling(max_new_tokens=6), Sampling(max_new_tokens=3),
                  Sampling(max_new_tokens=8, do_sample=True, temperature=1.3, seed=7), Sampling(max_new_tokens=5)]
        alone = [ens.generate(r, max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, temperature=s.temperature,
                              seed=s.seed)[0] for r, s in zip(reqs, params)]
        batch = DecodeBatch(ens)
        handles = batch.add(reqs[:2], params[:2])
        batch.step()
        batch.step()
        handles += batch.add(reqs[2:3], params[2:3])  # joins a running batch with a longer prompt
        batch.step()
        handles += batch.add(reqs[3:], params[3:])  # joins after request 1 left
        while len(batch):
            batch.step()
        got = [batch.result(h) for h in handles]
        for a, g in zip(alone, got):
            assert g.token_ids == a.token_ids and g.finish_reason == a.finish_reason
            assert g.weights == pytest.approx(a.weights, abs=1e-6)
    # a cancelled row stops at the next token boundary
    batch = DecodeBatch(ens)
    [h] = batch.add([reqs[0]], [Sampling(max_new_tokens=10)])
    batch.step()
    batch.cancel(h)
    batch.step()
    res = batch.result(h)
    assert res.finish_reason == "cancelled" and res.completion_tokens == 2 and len(batch) == 0
