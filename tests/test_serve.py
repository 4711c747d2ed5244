"""`ddfm serve` end to end: real uvicorn servers on loopback ports, real tiny experts, real HTTP.

The experts are two tiny-llava checkpoints from ``ddfm init`` (untrained: the protocol is
under test, not the answers) on real Fashion-MNIST images; the router's centroids are the
pixel features of two of those images, so which expert a request goes to is known.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import random
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from helpers.data import real_images
from helpers.servers import (
    ERROR_KEYS,
    NAMES,
    LiveServer,
    assert_error,
    data_url,
    make_assets,
    make_ensemble,
    metric,
    serve_config,
    user_message,
)

from ddfm.ensemble import EnsembleConfig
from ddfm.serve import ApiError, LocalBackend, Metrics, ServeConfig, create_app, sse
from ddfm.serve.chat import chat_job
from ddfm.serve.errors import from_validation
from ddfm.serve.protocol import ChatCompletionRequest

# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def ensemble(assets):
    return make_ensemble(assets)


@pytest.fixture(scope="module")
def server(assets, ensemble):
    live = LiveServer(create_app(serve_config(assets), ensemble=ensemble))
    yield live
    live.close()


# ----------------------------------------------------------------------------- protocol units

CFG = ServeConfig(ensemble=EnsembleConfig(experts=["unused"]), max_image_pixels=64 * 64, max_output_tokens=16,
                  default_max_tokens=4)


def parse_chat_request(body: dict, cfg: ServeConfig = CFG):
    """What the chat endpoint does with a body before the backend: pydantic, then the server's checks."""
    from pydantic import ValidationError

    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError as err:
        raise from_validation(err.errors(), body) from None
    return chat_job(request, cfg, ["ddfm"])


def test_parse_chat_request_maps_openai_messages_to_prompt_history_and_image():
    img = real_images(1)[0][0]
    body = {"model": "ddfm", "max_tokens": 5, "temperature": 0, "stop": "\n", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                     {"type": "text", "text": "What is this?"}]}]}
    [prompt] = parse_chat_request(body).prompts
    req, sampling = prompt.request, prompt.sampling
    assert req.prompt == "What is this?"
    assert req.history == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello."}]
    assert req.image.mode == "RGB" and req.image.size == (28, 28)
    assert np.array_equal(np.asarray(req.image.convert("L")), np.asarray(img))
    assert (sampling.max_new_tokens, sampling.do_sample, sampling.stop, sampling.logprobs) == (5, False, ["\n"], None)


@pytest.mark.parametrize("patch, status, code, param", [
    ({"model": "gpt-4"}, 404, "model_not_found", "model"),
    ({"n": 2}, 400, "unsupported_value", "n"),
    ({"temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"temperature": 3}, 400, "invalid_value", "temperature"),
    ({"top_p": 0}, 400, "invalid_value", "top_p"),
    ({"max_tokens": "8"}, 400, "invalid_type", "max_tokens"),
    ({"max_tokens": True}, 400, "invalid_type", "max_tokens"),
    ({"max_tokens": 17}, 400, "too_many_tokens", "max_tokens"),
    ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ({"stop": 3}, 400, "invalid_type", "stop"),
    ({"stream": "yes"}, 400, "invalid_type", "stream"),
    ({"messages": []}, 400, "invalid_value", "messages"),
    ({"messages": "hi"}, 400, "invalid_type", "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, 400, "invalid_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "invalid_type", "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "invalid_value",
     "messages[0].content[0].type"),
])
def test_parse_chat_request_rejects_each_bad_field_by_name(patch, status, code, param):
    body = {"model": "ddfm", "messages": [{"role": "user", "content": "hi"}], **patch}
    with pytest.raises(ApiError) as info:
        parse_chat_request(body)
    err = info.value
    assert (err.status, err.code, err.param) == (status, code, param), err.body()


def test_metrics_are_prometheus_exposition_that_prometheus_client_parses():
    from prometheus_client.parser import text_string_to_metric_families

    m = Metrics()
    m.requests.labels(route="/v1/models", status="200").inc()
    m.expert_requests.labels(expert='we"ird').inc()
    for s in (0.005, 0.3, 100.0):
        m.duration.observe(s)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(m.render().decode()) for s in family.samples}
    assert samples["ddfm_requests_total", (("route", "/v1/models"), ("status", "200"))] == 1
    assert samples["ddfm_expert_requests_total", (("expert", 'we"ird'),)] == 1
    assert samples["ddfm_request_duration_seconds_bucket", (("le", "0.01"),)] == 1
    assert samples["ddfm_request_duration_seconds_bucket", (("le", "0.5"),)] == 2
    assert samples["ddfm_request_duration_seconds_bucket", (("le", "+Inf"),)] == 3
    assert samples["ddfm_request_duration_seconds_count", ()] == 3


def test_sse_event_framing():
    assert sse({"a": "é"}) == 'data: {"a":"é"}\n\n'.encode()


# ----------------------------------------------------------------------------- the live server

def test_models_health_metrics(server):
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["ddfm"]
    assert len(models["data"][0]["ddfm"]["experts"]) == 2
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["backend"] == "local"
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in ("ddfm_requests_total", "ddfm_errors_total", "ddfm_completion_tokens_total",
                 "ddfm_request_duration_seconds_bucket", "ddfm_expert_requests_total"):
        assert name in metrics.text


def test_openai_client_matches_ensemble_generate(server, ensemble, assets):
    import openai

    from ddfm.ensemble import Request

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    for i, expected_expert in ((0, 0), (1, 1)):
        img = assets["images"][i]
        resp = client.chat.completions.create(model="ddfm", messages=user_message("What is this?", img),
                                              max_tokens=6, temperature=0)
        direct = ensemble.generate(Request(prompt="What is this?", image=img.convert("RGB")),
                                   max_new_tokens=6, do_sample=False)[0]
        choice = resp.choices[0]
        assert choice.message.role == "assistant"
        assert choice.message.content == direct.text
        assert choice.finish_reason in ("stop", "length")
        assert resp.usage.completion_tokens == direct.completion_tokens <= 6
        assert resp.usage.prompt_tokens == direct.prompt_tokens > 16  # 16 image tokens + text
        ext = resp.model_extra["ddfm"]
        assert len(ext["weights"]) == 2 and abs(sum(ext["weights"]) - 1) < 1e-5
        assert int(np.argmax(ext["weights"])) == expected_expert  # the router's centroid image
        assert ext["experts"] == direct.experts == ["expert-0", "expert-1"] and ext["mode"] == "centroid"
        assert ext["routed_to"] == [f"expert-{expected_expert}"]


def test_openai_client_streaming_equals_non_streaming(server, assets):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = user_message("Describe it.", assets["images"][2])
    full = client.chat.completions.create(model="ddfm", messages=messages, max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(model="ddfm", messages=messages, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(final) == 1 and final[0].choices[0].finish_reason == full.choices[0].finish_reason
    assert final[0].model_extra["ddfm"]["weights"] == full.model_extra["ddfm"]["weights"]
    # where docs/ARCHITECTURE.md says it is: on the chunk with the finish_reason, and only there
    doc = (Path(__file__).parents[1] / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    assert "is on the chunk that carries the `finish_reason`" in " ".join(doc.split())
    assert [c for c in chunks if (c.model_extra or {}).get("ddfm")] == final
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_format_ends_with_done(server, assets):
    body = {"model": "ddfm", "messages": user_message("Hi", assets["images"][3]), "stream": True, "max_tokens": 3}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        raw = resp.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert json.loads(event[len("data: "):])["object"] == "chat.completion.chunk"


def test_text_only_request_and_sampling_parameters(server):
    body = {"model": "ddfm", "messages": [{"role": "system", "content": "Answer briefly."},
                                          {"role": "user", "content": "Name a shoe."}],
            "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n"]}
    a = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    b = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert a.status_code == 200, a.text
    assert a.json()["usage"]["completion_tokens"] <= 4
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]  # seeded


def test_stop_sequences_cut_the_text_in_both_modes(server, assets):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = user_message("What is this?", assets["images"][5])
    full = client.chat.completions.create(model="ddfm", messages=messages, max_tokens=16, temperature=0)
    text = full.choices[0].message.content
    assert len(text) >= 6, text
    stop = text[3:5]  # a piece of the greedy answer: the answer must end right before it
    cut = client.chat.completions.create(model="ddfm", messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="ddfm", messages=messages, max_tokens=16, temperature=0, stop=[stop], stream=True) if c.choices)
    assert streamed == cut.choices[0].message.content  # nothing past the stop leaked into the stream


def test_client_leaving_mid_stream_frees_its_slot(server, assets):
    body = {"model": "ddfm", "messages": user_message("Hi", assets["images"][4]), "stream": True,
            "max_tokens": 16, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert next(resp.iter_lines()).startswith("data: ")
    deadline = time.monotonic() + 30
    while httpx.get(server.url + "/health").json()["in_flight"] != 0:
        assert time.monotonic() < deadline, "the abandoned stream never released its slot"
        time.sleep(0.05)
    assert _post(server, {**body, "stream": False}).status_code == 200


def _post(server, body=None, *, content=None, headers=None):
    return httpx.post(server.url + "/v1/chat/completions", json=body if content is None else None,
                      content=content, headers=headers, timeout=60)


def test_every_bad_input_is_a_4xx_with_an_openai_error_body(server, assets, tmp_path):
    img = assets["images"][0]
    ok = {"model": "ddfm", "messages": user_message("hi"), "max_tokens": 2}
    with_url = lambda url: {**ok, "messages": [{"role": "user", "content": [  # noqa: E731
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]}
    png = io.BytesIO()
    img.resize((100, 100)).save(png, format="PNG")
    too_big_image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    corrupt = io.BytesIO()
    img.save(corrupt, format="PNG")
    truncated = "data:image/png;base64," + base64.b64encode(corrupt.getvalue()[:60]).decode()
    cases = [
        (dict(content=b'{"model": "ddfm", "messages": [}'), 400, "invalid_json", "not valid JSON"),
        (dict(content=b"\xff\xfe garbage"), 400, "invalid_json", "UTF-8"),
        (dict(content=b"[1, 2]"), 400, "invalid_type", "JSON object"),
        (dict(content=b"[" * 50_000), 400, "invalid_json", "nested"),
        (dict(body={**ok, "seed": 10**30}), 400, "invalid_value", "seed"),
        (dict(content=b'{"model": "ddfm", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'),
         400, "invalid_value", "temperature"),
        (dict(body={**ok, "temperature": "warm"}), 400, "invalid_type", "temperature"),
        (dict(body={**ok, "n": 3}), 400, "unsupported_value", "'n'"),
        (dict(body={**ok, "model": "gpt-4o"}), 404, "model_not_found", "gpt-4o"),
        (dict(body=with_url("data:image/png;base64,!!notbase64!!")), 400, "invalid_base64", "base64"),
        (dict(body=with_url("data:image/png;base64," + base64.b64encode(b"hello world, not a png").decode())),
         400, "invalid_image", "not an image"),
        (dict(body=with_url(truncated)), 400, "invalid_image", "image"),
        (dict(body=with_url(too_big_image)), 400, "image_too_large", "100x100"),
        (dict(body=with_url("https://example.com/cat.png")), 400, "image_url_not_allowed", "remote"),
        (dict(body=with_url("/etc/passwd")), 400, "image_url_not_allowed", "local"),
        (dict(body=with_url("file:///etc/hostname")), 400, "image_url_not_allowed", "local"),
        (dict(body={**ok, "max_tokens": 10_000}), 400, "too_many_tokens", "max_tokens"),
        (dict(body={**ok, "messages": user_message("word " * 400)}), 400, "context_length_exceeded", "tokens"),
        (dict(body={**ok, "messages": user_message("x" * 70_000)}), 413, "request_too_large", "bytes"),
        (dict(body={**ok, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(img)}},
            {"type": "image_url", "image_url": {"url": data_url(img)}}]}]}), 400, "too_many_images", "one image"),
    ]
    for kwargs, status, code, mentions in cases:
        assert_error(_post(server, **kwargs), status, code=code, mentions=mentions)
    resp = httpx.get(server.url + "/v1/nothing-here")
    assert_error(resp, 404, code="not_found")
    assert_error(httpx.get(server.url + "/v1/chat/completions"), 405, code="method_not_allowed")
    # still serving, and a valid request after all that is answered normally
    assert _post(server, ok).status_code == 200
    for i in range(20):  # random paths do not grow the metrics (bounded label values)
        httpx.get(server.url + f"/probe-{i}-{random.random()}")
    metrics = httpx.get(server.url + "/metrics").text
    assert metric(metrics, 'ddfm_errors_total{code="invalid_base64"}') == 1
    assert "probe" not in metrics and 'route="other",status="404"' in metrics


def test_prompt_plus_max_tokens_must_fit_the_experts_context(assets, ensemble):
    backend = LocalBackend(ensemble, serve_config(assets, max_prompt_tokens=100_000), Metrics())
    context = ensemble.experts[0].config.get_text_config().max_position_embeddings
    body = {"model": "ddfm", "max_tokens": 8, "messages": user_message("hello " * context)}
    with pytest.raises(ApiError) as info:
        backend.prepare(parse_chat_request(body))
    assert info.value.code == "context_length_exceeded" and str(context) in info.value.message
    short = parse_chat_request({**body, "messages": user_message("hello")})
    backend.prepare(short)
    assert 0 < short.prompts[0].prompt_tokens < 20


@pytest.mark.slow
def test_remote_and_local_images_only_when_enabled(assets, ensemble):
    import functools
    import http.server

    root = assets["root"]
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    live = LiveServer(create_app(serve_config(assets, allow_remote_images=True, image_root=str(root / "images")),
                                 ensemble=ensemble))
    try:
        def ask(url):
            return _post(live, {"model": "ddfm", "max_tokens": 2, "temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                             {"type": "image_url", "image_url": {"url": url}}]}]})

        inline = ask(data_url(assets["images"][1])).json()
        remote = ask(f"http://127.0.0.1:{files.server_address[1]}/images/001.png").json()
        local = ask("001.png").json()
        file_url = ask(f"file://{root}/images/001.png").json()
        for out in (remote, local, file_url):  # the same pixels, so the same route and the same answer
            assert out["choices"][0]["message"]["content"] == inline["choices"][0]["message"]["content"]
            assert out["ddfm"]["weights"] == inline["ddfm"]["weights"]
        assert_error(ask("file:///etc/hostname"), 400, code="image_url_not_allowed", mentions="outside")
        assert_error(ask("../train.jsonl"), 400, code="image_url_not_allowed", mentions="outside")
        assert_error(ask("missing.png"), 400, code="image_not_found")
        assert_error(ask(f"http://127.0.0.1:{files.server_address[1]}/nothing.png"), 400, code="image_fetch_failed")
    finally:
        live.close()
        files.shutdown()


def test_text_only_experts_answer_text_and_refuse_images(assets, tmp_path):
    from ddfm.ensemble import Ensemble
    from ddfm.init import InitConfig, init

    rows = [{"id": f"t-{i}", "conversations": [{"from": "human", "value": f"Name garment {i}."},
                                                {"from": "gpt", "value": NAMES[i % 10]}]} for i in range(20)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = init(InitConfig(preset="tiny-lm", data=str(tmp_path / "text.jsonl"), out=str(tmp_path / "lm"), vocab_size=300))
    live = LiveServer(create_app(serve_config(assets, experts=[str(lm)], router=None),
                                 ensemble=Ensemble.from_pretrained([str(lm)])))
    try:
        ok = _post(live, {"model": "ddfm", "max_tokens": 3, "messages": user_message("Name a garment.")})
        assert ok.status_code == 200 and ok.json()["ddfm"]["routed_to"] == ["lm"]
        assert_error(_post(live, {"model": "ddfm", "max_tokens": 3, "messages": user_message("x", assets["images"][0])}),
                     400, code="unsupported_input", mentions="text-only")
    finally:
        live.close()


def test_api_key_is_required_when_set(assets, ensemble):
    import openai

    live = LiveServer(create_app(serve_config(assets, api_key="s3cret"), ensemble=ensemble))
    try:
        body = {"model": "ddfm", "messages": user_message("hi"), "max_tokens": 2}
        assert_error(_post(live, body), 401, code="invalid_api_key")
        assert_error(_post(live, body, headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        assert_error(httpx.get(live.url + "/v1/models"), 401)
        assert httpx.get(live.url + "/health").status_code == 200
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="ddfm", messages=user_message("hi"), max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        live.close()


def _send_partial(live: LiveServer, body: dict, n: int) -> tuple[socket.socket, bytes]:
    """Send the headers and the first ``n`` bytes of a request body; return the socket and the rest."""
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:n])
    return sock, payload[n:]


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(60)
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


@pytest.mark.slow
def test_concurrency_limit_answers_429_and_recovers(assets, ensemble):
    live = LiveServer(create_app(serve_config(assets, max_concurrent=1, body_timeout=1.0), ensemble=ensemble))
    try:
        body = {"model": "ddfm", "messages": user_message("hi"), "max_tokens": 2}
        # a request whose body is still arriving holds the only slot
        sock, rest = _send_partial(live, body, 10)
        time.sleep(0.3)
        assert_error(_post(live, body), 429, code="too_many_concurrent_requests")
        sock.sendall(rest)
        assert _read_all(sock).startswith(b"HTTP/1.1 200")
        assert _post(live, body).status_code == 200
        # a client that never finishes its body loses the slot after body_timeout
        sock, _ = _send_partial(live, body, 10)
        reply = _read_all(sock)
        assert reply.startswith(b"HTTP/1.1 408") and b'"code":"request_timeout"' in reply
        assert _post(live, body).status_code == 200
    finally:
        live.close()


def test_batcher_decodes_concurrent_requests_together_grouped_by_expert(server, assets):
    before = httpx.get(server.url + "/metrics").text
    bodies = [{"model": "ddfm", "messages": user_message("What is this?", assets["images"][i % 2]),
               "max_tokens": 3, "temperature": 0} for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        resps = list(pool.map(lambda b: _post(server, b), bodies))
    assert all(r.status_code == 200 for r in resps)
    by_image = {}
    for i, r in enumerate(resps):  # same image, same greedy answer, whatever the batch
        by_image.setdefault(i % 2, set()).add(r.json()["choices"][0]["message"]["content"])
        assert int(np.argmax(r.json()["ddfm"]["weights"])) == i % 2
    assert all(len(s) == 1 for s in by_image.values())
    after = httpx.get(server.url + "/metrics").text
    delta = lambda name: metric(after, name) - metric(before, name)  # noqa: E731
    for k in (0, 1):  # requests per expert, as routed
        assert delta(f'ddfm_expert_requests_total{{expert="expert-{k}"}}') == 4
    assert delta("ddfm_completion_tokens_total") > 0
    assert delta("ddfm_request_duration_seconds_count") == 8
    assert delta("ddfm_batch_joined_total") == 8
    steps = delta("ddfm_batch_rows_count")
    alone = delta('ddfm_batch_rows_bucket{le="1.0"}')
    assert steps > 0 and alone < steps  # some steps decoded several requests together


# ----------------------------------------------------------------------------- API docs

def test_openapi_docs_are_on_and_validation_errors_keep_openai_schema(server):
    spec = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models"):
        assert path in spec["paths"], sorted(spec["paths"])
    body_schema = spec["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema["$ref"].endswith("/CompletionRequest")
    assert {"prompt", "echo", "logprobs", "max_tokens"} <= set(spec["components"]["schemas"]["CompletionRequest"]
                                                               ["properties"])
    assert httpx.get(server.url + "/docs").status_code == 200
    # FastAPI's validation, answered in OpenAI's schema with the field named
    err = assert_error(httpx.post(server.url + "/v1/completions", json={"model": "ddfm", "prompt": 5}), 400,
                       code="invalid_type", param="prompt")
    assert "token" in err["message"]
    assert_error(httpx.post(server.url + "/v1/completions", json={"model": "ddfm"}), 400, code="missing",
                 param="prompt")


# ----------------------------------------------------------------------------- log-probabilities

def mode_ensemble(ensemble, mode: str, top_k=None):
    """The loaded experts and router under another routing mode (no reloading)."""
    from ddfm.ensemble import Ensemble

    return Ensemble(ensemble.experts, ensemble.processor, ensemble.router, names=ensemble.expert_names, mode=mode,
                    top_k=top_k)


def token_text(ensemble, token_id: int) -> str:
    return ensemble.tokenizer.decode([int(token_id)])


MODES = [("centroid", 1), ("centroid", "all"), ("posterior", None), ("uniform", None)]


@pytest.mark.parametrize("mode, top_k", MODES)
def test_completions_echo_scores_the_prompt_with_the_mixture_under_every_mode(assets, ensemble, mode, top_k):
    import openai

    from ddfm.ensemble import Request

    ens = mode_ensemble(ensemble, mode, top_k)
    live = LiveServer(create_app(serve_config(assets), ensemble=ens))
    try:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)
        ids = ens.tokenizer("The second expert knows about sandals and boots.")["input_ids"]
        resp = client.completions.create(model="ddfm", prompt=[ids], max_tokens=0, echo=True, logprobs=3)
        [ref] = ens.score_tokens([Request(prompt="", token_ids=ids)], top_logprobs=3)
        [choice] = resp.choices
        lp = choice.logprobs
        assert choice.text == ens.tokenizer.decode(ids) and resp.usage.prompt_tokens == len(ids)
        assert lp.tokens == [token_text(ens, t) for t in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert np.allclose(lp.token_logprobs[1:], ref["token_logprobs"][1:], atol=1e-6, rtol=0)
        for t, top, got in zip(ids[1:], ref["top_logprobs"][1:], lp.top_logprobs[1:]):
            want: dict = {}
            for a, v in top:  # ids whose text is the same (e.g. partial UTF-8 bytes): the likelier one
                want.setdefault(token_text(ens, a), v)
            want.setdefault(token_text(ens, t), None)
            assert set(got) == set(want)
            assert all(abs(got[k] - v) < 1e-6 for k, v in want.items() if v is not None)
        assert lp.text_offset == list(np.cumsum([0] + [len(x) for x in lp.tokens[:-1]]))
        assert choice.model_extra["ddfm"]["mode"] == mode
        assert np.allclose(choice.model_extra["ddfm"]["weights"], ref["weights"], atol=1e-6)
        # generated tokens: the mixture's own log-probabilities, as Ensemble.generate gives them
        out = client.completions.create(model="ddfm", prompt="What is this?", max_tokens=5, temperature=0, logprobs=2)
        [gen] = ens.generate(Request(prompt="What is this?", raw=True), max_new_tokens=5, logprobs=2)
        assert out.choices[0].text == gen.text and out.choices[0].finish_reason == gen.finish_reason
        assert np.allclose(out.choices[0].logprobs.token_logprobs, [e["logprob"] for e in gen.logprobs], atol=1e-6)
        assert out.choices[0].logprobs.tokens == [token_text(ens, e["token_id"]) for e in gen.logprobs]
    finally:
        live.close()


def test_single_expert_logprobs_equal_plain_transformers(assets, upstreams):
    """One expert served alone: echo log-probabilities and greedy tokens are the model's own."""
    import openai
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(assets["experts"][0]).eval()
    tok = upstreams[0].app.state.ddfm.backend.ens.tokenizer
    ids = tok("A pullover, a sandal and an ankle boot.")["input_ids"]
    client = openai.OpenAI(base_url=upstreams[0].url + "/v1", api_key="unused", max_retries=0)
    resp = client.completions.create(model="expert-0", prompt=ids, max_tokens=4, echo=True, logprobs=1,
                                     temperature=0)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)  # (T, V)
        greedy = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    expected = [logp[t, ids[t + 1]].item() for t in range(len(ids) - 1)]
    lp = resp.choices[0].logprobs
    assert np.allclose(lp.token_logprobs[1:len(ids)], expected, atol=1e-5, rtol=0)
    eos = set(upstreams[0].app.state.ddfm.backend.ens.eos_ids)
    generated = lp.tokens[len(ids):]
    n = next((i + 1 for i, t in enumerate(greedy) if t in eos), len(greedy))
    assert generated == [tok.decode([t]) for t in greedy[:n]]
    for top, v in zip(lp.top_logprobs[len(ids):], lp.token_logprobs[len(ids):]):
        assert max(top.values()) == v  # greedy: the chosen token is the most likely one


def test_lm_eval_harness_loglikelihood_request_parses_as_it_expects(server, ensemble):
    """The exact body lm-evaluation-harness's ``local-completions`` sends for loglikelihood,
    and its parse (``LocalCompletionsAPI.parse_logprobs``: sum of token_logprobs[ctxlen:-1],
    greedy iff each equals the max of its top_logprobs)."""
    from ddfm.ensemble import Request

    tok = ensemble.tokenizer
    pairs = [("The capital of", " France"), ("A pullover is a", " garment worn on the body")]
    inputs = [tok(c)["input_ids"] + tok(x, add_special_tokens=False)["input_ids"] for c, x in pairs]
    ctxlens = [len(tok(c)["input_ids"]) for c, _ in pairs]
    body = {"model": "ddfm", "prompt": inputs, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    try:
        from lm_eval.models.openai_completions import LocalCompletionsAPI
        parsed = LocalCompletionsAPI.parse_logprobs(out, tokens=inputs, ctxlens=ctxlens)
    except ImportError:  # the same lines, as lm_eval 0.4 has them
        parsed = []
        for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
            lps = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            parsed.append((sum(lps), all(t == max(top.values()) for t, top in zip(lps, tops))))
    refs = ensemble.score_tokens([Request(prompt="", token_ids=ids) for ids in inputs], top_logprobs=1)
    for (loglik, greedy), ref, ctxlen, ids in zip(parsed, refs, ctxlens, inputs):
        assert abs(loglik - sum(ref["token_logprobs"][ctxlen:])) < 1e-5
        assert greedy == all(top[0][0] == t for t, top in zip(ids[ctxlen:], ref["top_logprobs"][ctxlen:]))
    assert [c["index"] for c in out["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["tokens"]) == len(ids) + 1 for c, ids in zip(out["choices"], inputs))


def test_completions_stream_equals_non_stream_and_keeps_choices_apart(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    prompts = ["What is this?", "Name a shoe:"]
    full = client.completions.create(model="ddfm", prompt=prompts, max_tokens=6, temperature=0, echo=True)
    chunks = list(client.completions.create(model="ddfm", prompt=prompts, max_tokens=6, temperature=0, echo=True,
                                            stream=True, stream_options={"include_usage": True}))
    for i, prompt in enumerate(prompts):
        text = "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
        assert text == full.choices[i].text and text.startswith(prompt)
        last = [c for c in chunks if c.choices and c.choices[0].index == i and c.choices[0].finish_reason]
        assert len(last) == 1 and last[0].choices[0].finish_reason == full.choices[i].finish_reason
        assert last[0].choices[0].model_extra["ddfm"] == full.choices[i].model_extra["ddfm"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@pytest.mark.parametrize("patch, code, param", [
    ({"n": 2}, "unsupported_value", "n"),
    ({"best_of": 3}, "unsupported_value", "best_of"),
    ({"logprobs": 6}, "invalid_value", "logprobs"),
    ({"max_tokens": 0}, "invalid_value", "max_tokens"),
    ({"max_tokens": 17}, "too_many_tokens", "max_tokens"),
    ({"prompt": [[1, 2, 10**6]]}, "unsupported_input", "prompt"),
    ({"prompt": []}, "invalid_value", "prompt"),
    ({"suffix": "x"}, "unsupported_value", "suffix"),
    ({"echo": "yes"}, "invalid_type", "echo"),
])
def test_completions_refuse_what_they_do_not_support_by_name(server, patch, code, param):
    body = {"model": "ddfm", "prompt": "hi", "max_tokens": 2, **patch}
    assert_error(httpx.post(server.url + "/v1/completions", json=body, timeout=60), 400, code=code, param=param)


def test_chat_logprobs_are_the_mixtures_in_openais_chat_format(server, ensemble, assets):
    import openai

    from ddfm.ensemble import Request

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    messages = user_message("What is this?", assets["images"][1])
    resp = client.chat.completions.create(model="ddfm", messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2)
    [gen] = ensemble.generate(Request(prompt="What is this?", image=assets["images"][1].convert("RGB")),
                              max_new_tokens=5, logprobs=2)
    content = resp.choices[0].logprobs.content
    assert [c.token for c in content] == [token_text(ensemble, e["token_id"]) for e in gen.logprobs]
    assert np.allclose([c.logprob for c in content], [e["logprob"] for e in gen.logprobs], atol=1e-6)
    for c, e in zip(content, gen.logprobs):
        assert c.bytes == list(c.token.encode())
        assert [t.token for t in c.top_logprobs] == [token_text(ensemble, i) for i, _ in e["top"]]
        assert np.allclose([t.logprob for t in c.top_logprobs], [v for _, v in e["top"]], atol=1e-6)
    streamed = [c for chunk in client.chat.completions.create(
        model="ddfm", messages=messages, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, stream=True)
        if chunk.choices and chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    plain = client.chat.completions.create(model="ddfm", messages=messages, max_tokens=5, temperature=0)
    assert plain.choices[0].logprobs is None


# ----------------------------------------------------------------------------- continuous batching

def test_requests_with_different_parameters_share_the_batch_and_answer_as_alone(server, assets):
    images = assets["images"]
    bodies = [{"model": "ddfm", "messages": user_message("What is this?", images[i % 6]),
               "max_tokens": [2, 5, 9, 16][i % 4], "temperature": [0, 0.9][i % 2], "seed": 10 + i,
               "top_p": [1.0, 0.8][(i // 2) % 2], "stop": [[], ["e"]][(i // 4) % 2]} for i in range(8)]
    alone = [_post(server, b).json() for b in bodies]
    before = httpx.get(server.url + "/metrics").text
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: _post(server, b).json(), bodies))
    after = httpx.get(server.url + "/metrics").text
    for a, t, b in zip(alone, together, bodies):
        assert t["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"], b
        assert t["usage"] == a["usage"] and t["usage"]["completion_tokens"] <= b["max_tokens"]
    steps = metric(after, "ddfm_batch_rows_count") - metric(before, "ddfm_batch_rows_count")
    alone_steps = metric(after, 'ddfm_batch_rows_bucket{le="1.0"}') - metric(before, 'ddfm_batch_rows_bucket{le="1.0"}')
    assert alone_steps < steps  # mixed parameters decoded together


def test_a_short_request_joins_a_running_long_one_and_leaves_first(server, assets):
    """Requests join and leave at token boundaries: a 2-token request sent while a 16-token
    stream is decoding is answered while that stream still has tokens to send (a batcher
    that runs whole generate calls would make it wait until the long one had ended)."""
    long_body = {"model": "ddfm", "messages": user_message("Describe it.", assets["images"][7]), "stream": True,
                 "max_tokens": 16, "temperature": 0.8, "seed": 1}
    short = {"model": "ddfm", "messages": user_message("What is this?", assets["images"][8]), "max_tokens": 2,
             "temperature": 0}
    events: list[tuple[float, str]] = []
    started = threading.Event()

    def read_long():
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=long_body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    events.append((time.monotonic(), line))
                    started.set()

    reader = threading.Thread(target=read_long)
    reader.start()
    assert started.wait(60)
    answer = _post(server, short)
    answered = time.monotonic()
    reader.join(60)
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] <= 2
    chunks = [json.loads(line[6:]) for _, line in events if line != "data: [DONE]"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    later = [c for t, c in zip([t for t, _ in events], chunks) if t > answered]
    assert later and later[-1]["choices"][0]["finish_reason"] == "length"  # the long one went on after


# ----------------------------------------------------------------------------- shutdown

def test_graceful_shutdown_finishes_running_streams(assets, ensemble):
    live = LiveServer(create_app(serve_config(assets), ensemble=ensemble))
    body = {"model": "ddfm", "messages": user_message("Describe it.", assets["images"][9]), "stream": True,
            "max_tokens": 16, "temperature": 0.8, "seed": 2}
    try:
        with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=60) as resp:
            lines = resp.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            live.server.should_exit = True  # what SIGINT/SIGTERM do
            rest = [line for line in lines if line.startswith("data: ")]
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        live.thread.join(30)
        assert not live.thread.is_alive()
        with pytest.raises(httpx.HTTPError):  # and it takes no new work
            httpx.get(live.url + "/health", timeout=2)
    finally:
        live.close()


# ----------------------------------------------------------------------------- gateway mode

@pytest.fixture(scope="module")
def upstreams(assets):
    """Each expert behind its own real ddfm server (a single-model ensemble): the 'remote' experts."""
    from ddfm.ensemble import Ensemble

    lives = [LiveServer(create_app(serve_config(assets, experts=[e], router=None, model_name=f"expert-{k}"),
                                   ensemble=Ensemble.from_pretrained([e])))
             for k, e in enumerate(assets["experts"])]
    yield lives
    for live in lives:
        live.close()


def test_gateway_forwards_to_the_routed_expert_streaming_included(assets, upstreams):
    import openai

    gw = LiveServer(create_app(serve_config(assets, experts=[], upstream=[f"{k}={u.url}/v1"
                                                                           for k, u in enumerate(upstreams)])))
    try:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        for k in (0, 1):
            messages = user_message("What is this?", assets["images"][k])
            via_gateway = client.chat.completions.create(model="ddfm", messages=messages, max_tokens=6,
                                                         temperature=0)
            direct = openai.OpenAI(base_url=upstreams[k].url + "/v1", api_key="x").chat.completions.create(
                model=f"expert-{k}", messages=messages, max_tokens=6, temperature=0)
            assert via_gateway.choices[0].message.content == direct.choices[0].message.content
            assert via_gateway.model == "ddfm"
            assert via_gateway.usage.completion_tokens == direct.usage.completion_tokens
            ext = via_gateway.model_extra["ddfm"]
            assert ext["routed_to"] == [f"expert-{k}"] and int(np.argmax(ext["weights"])) == k
            assert ext["weights"][1 - k] == 0.0  # top-1: the other expert is not asked
            chunks = list(client.chat.completions.create(model="ddfm", messages=messages, max_tokens=6,
                                                         temperature=0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
                direct.choices[0].message.content
            assert chunks[-1].model_extra["ddfm"]["routed_to"] == [f"expert-{k}"]
        # validation happens at the gateway, before anything is forwarded
        assert_error(_post(gw, {"model": "ddfm", "messages": user_message("hi"), "n": 2}), 400, code="unsupported_value")
        metrics = httpx.get(gw.url + "/metrics").text
        assert 'ddfm_expert_requests_total{expert="expert-0"}' in metrics
    finally:
        gw.close()


@pytest.mark.slow
def test_gateway_upstream_down_or_silent_gives_503_not_a_hang(assets, upstreams):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    dead_port = closed.getsockname()[1]
    closed.close()  # nothing listens here
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts connections, never answers
    gw = LiveServer(create_app(serve_config(
        assets, experts=[], upstream=[f"0={upstreams[0].url}", f"1=http://127.0.0.1:{dead_port}/v1"],
        upstream_timeout=0.75, upstream_connect_timeout=1.0)))
    gw_silent = LiveServer(create_app(serve_config(
        assets, experts=[], upstream=[f"0=http://127.0.0.1:{silent.getsockname()[1]}", f"1={upstreams[1].url}"],
        upstream_timeout=0.75, upstream_connect_timeout=1.0)))
    try:
        to = lambda k, stream=False: {"model": "ddfm", "max_tokens": 2, "stream": stream,  # noqa: E731
                                      "messages": user_message("What is this?", assets["images"][k])}
        for stream in (False, True):
            t0 = time.monotonic()
            assert_error(_post(gw, to(1, stream)), 503, code="upstream_unavailable", mentions="unreachable")
            assert_error(_post(gw_silent, to(0, stream)), 503, code="upstream_timeout", mentions="timeout")
            assert time.monotonic() - t0 < 10
        assert _post(gw, to(0)).status_code == 200  # the live expert still answers
        assert _post(gw_silent, to(1)).status_code == 200
    finally:
        gw.close()
        gw_silent.close()
        silent.close()


def test_config_defaults_are_safe(assets):
    experts = EnsembleConfig(experts=assets["experts"])
    cfg = ServeConfig(ensemble=experts)
    assert cfg.host == "127.0.0.1" and not cfg.allow_remote_images and cfg.image_root is None
    with pytest.raises(ValueError, match="max_concurrent"):
        ServeConfig(ensemble=experts, max_concurrent=0)
    with pytest.raises(ValueError, match="mode"):
        ServeConfig(ensemble=EnsembleConfig(experts=assets["experts"], mode="best"))


def test_gateway_config_must_cover_every_expert(assets):
    with pytest.raises(ValueError, match=r"no --upstream for \[1\]"):
        create_app(serve_config(assets, experts=[], upstream=["0=http://127.0.0.1:9/v1"]))
    with pytest.raises(ValueError, match="k=URL"):
        ServeConfig(upstream=["http://127.0.0.1:9/v1"], ensemble=EnsembleConfig(router=assets["router"]))
    with pytest.raises(ValueError, match="exclude"):
        ServeConfig(ensemble=EnsembleConfig(experts=assets["experts"]), upstream=["0=http://127.0.0.1:9"])


# ----------------------------------------------------------------------------- load

@pytest.mark.parametrize("n, concurrency", [(24, 8), pytest.param(200, 16, marks=pytest.mark.slow)])
def test_load_of_mixed_valid_and_invalid_requests_in_parallel(server, assets, n, concurrency):
    rng = random.Random(0)
    valid = lambda i: {"model": "ddfm", "max_tokens": rng.choice([1, 2, 4]), "temperature": rng.choice([0, 0.8]),  # noqa: E731
                       "stream": i % 5 == 0, "messages": user_message("What is this?", assets["images"][i % 24])}
    invalid = [
        {"content": b"{not json"}, {"body": {"model": "nope", "messages": user_message("x")}},
        {"body": {"model": "ddfm", "messages": user_message("x"), "n": 2}},
        {"body": {"model": "ddfm", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}},
        {"body": {"model": "ddfm", "messages": user_message("x"), "max_tokens": 99999}},
    ]
    jobs = [("valid", {"body": valid(i)}) if i % 2 == 0 else ("invalid", invalid[i % len(invalid)])
            for i in range(n)]
    rng.shuffle(jobs)

    def run(job):
        kind, kwargs = job
        with httpx.Client(timeout=120) as c:
            r = c.post(server.url + "/v1/chat/completions", json=kwargs.get("body"), content=kwargs.get("content"))
            return kind, r.status_code, r.text

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(run, jobs))
    elapsed = time.monotonic() - t0
    assert not [r for r in results if r[1] >= 500], "5xx under load"
    for kind, status, text in results:
        if kind == "valid":
            assert status == 200, text
            if text.startswith("data: "):
                assert text.endswith("data: [DONE]\n\n")
            else:
                assert json.loads(text)["choices"][0]["message"]["content"] is not None
        else:
            assert 400 <= status < 500
            assert set(json.loads(text)["error"]) == ERROR_KEYS
    assert httpx.get(server.url + "/health").json()["in_flight"] == 0
    print(f"load test: {n} requests at concurrency {concurrency} in {elapsed:.1f} s")


@pytest.mark.slow
def test_ddfm_serve_command_in_a_subprocess(assets):
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "ddfm", "serve", "--experts", *assets["experts"],
                             "--router", assets["router"], "--port", str(port), "--max-output-tokens", "8",
                             "--header-timeout", "3", "--log-level", "warning"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "DDFM_API_KEY": "k-from-env"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "ddfm serve exited"
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "ddfm serve did not come up"
                time.sleep(0.3)
        assert "k-from-env" not in Path(f"/proc/{proc.pid}/cmdline").read_text()  # not in the process list
        headers = {"Authorization": "Bearer k-from-env"}
        assert httpx.get(url + "/metrics").status_code == 401
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]  # the CLI's uvicorn config
        assert httpx.get(url + "/health", timeout=1).json() == {"status": "ok"}
        for s in idle:
            s.close()
        r = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60, json={
            "model": "ddfm", "max_tokens": 3, "messages": user_message("What is this?", assets["images"][1])})
        assert r.status_code == 200 and r.json()["ddfm"]["routed_to"] == ["expert-1"]
        assert_error(httpx.post(url + "/v1/chat/completions", headers=headers, json={
            "model": "ddfm", "max_tokens": 9, "messages": user_message("x")}), 400, code="too_many_tokens")
        # memory stays flat across waves of mixed requests (after the first wave has warmed up)
        rss = lambda: int(open(f"/proc/{proc.pid}/status").read().split("VmRSS:")[1].split()[0]) / 1024  # noqa: E731
        bodies = [{"model": "ddfm", "max_tokens": 2, "stream": i % 3 == 0,
                   "messages": user_message("What is this?", assets["images"][i % 24])} for i in range(40)]
        bodies += [{"model": "ddfm", "messages": user_message("x"), "n": 2}] * 20
        sizes = []
        with httpx.Client(headers=headers, timeout=60) as client, concurrent.futures.ThreadPoolExecutor(8) as pool:
            for _ in range(3):
                codes = list(pool.map(lambda b: client.post(url + "/v1/chat/completions", json=b).status_code,
                                      bodies))
                assert sorted(set(codes)) == [200, 400]
                sizes.append(rss())
        assert sizes[-1] - sizes[0] < 40, f"server RSS grew across waves: {sizes} MiB"
    finally:
        proc.terminate()
        assert proc.wait(30) is not None


def test_the_prompt_is_encoded_once_while_its_length_is_checked(assets, ensemble):
    """``prepare`` (a request thread) encodes the prompt; the batcher thread reuses it."""
    backend = LocalBackend(ensemble, serve_config(assets), Metrics())
    job = parse_chat_request({"model": "ddfm", "messages": user_message("What is this?", assets["images"][0])})
    backend.prepare(job)
    request = job.prompts[0].request
    assert request.encoded is not None and len(request.encoded.ids) == job.prompts[0].prompt_tokens
    assert ensemble.prompts.encode(request) is request.encoded


def test_a_key_given_on_the_command_line_is_warned_about(assets, monkeypatch, caplog):
    """``--api-key`` puts the key in the process list (ps): ``serve`` says so and names the
    alternatives; a key from the environment or a file gets no warning."""
    import sys

    from ddfm.serve.cli import serve

    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: None)  # build the server, do not run it
    cfg = serve_config(assets, api_key="s3cret")
    monkeypatch.setattr(sys, "argv", ["ddfm", "serve", "--api-key", "s3cret"])
    with caplog.at_level("WARNING", logger="ddfm.serve.cli"):
        serve(cfg)
    assert any("process list" in r.getMessage() and "DDFM_API_KEY" in r.getMessage() for r in caplog.records)
    caplog.clear()
    monkeypatch.setattr(sys, "argv", ["ddfm", "serve"])
    with caplog.at_level("WARNING", logger="ddfm.serve.cli"):
        serve(cfg)
    assert not any("process list" in r.getMessage() for r in caplog.records)
