"""The OpenAI-compatible server end to end with the real `openai` client."""
import concurrent.futures
import json
import time

import httpx
import openai
import pytest

from conftest import API_KEY, MODEL_NAME, metric


def test_models_health_version(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME]
    assert httpx.get(server + "/health").status_code == 200
    assert "version" in httpx.get(server + "/version").json()


def test_completion(client):
    r = client.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8,
                                  temperature=0)
    c = r.choices[0]
    assert c.text and c.finish_reason == "length"
    assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8


def test_chat_answers(client):
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].message.role == "assistant"


def test_chat_stream_equals_non_stream(client):
    msgs = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL_NAME, messages=msgs, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    parts, usage, finish = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
    assert "".join(parts) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == full.usage.completion_tokens


def test_n_samples_and_seed(client):
    kw = dict(model=MODEL_NAME, prompt="Once upon a time", max_tokens=12, temperature=0.9, n=3, seed=7)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1


def test_logprobs(client):
    r = client.completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4
    assert all(len(t) >= 1 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    c = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_stop_string(client):
    base = client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0)
    text = base.choices[0].text
    stop = text.strip()[2:4] if len(text.strip()) > 4 else text[-2:]
    r = client.completions.create(model=MODEL_NAME, prompt="1, 2, 3, 4,", max_tokens=12, temperature=0,
                                  stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_errors(server, client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="word " * 600, max_tokens=2)
    assert "maximum context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "x"}],
                                       top_p=0)
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(server + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.post(server + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401


def test_tokenize_detokenize(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "Hello world"


def test_disconnect_frees_blocks(server, client):
    with httpx.stream("POST", server + "/v1/completions", timeout=300,
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": MODEL_NAME, "prompt": "Tell me a long story.", "max_tokens": 400,
                            "stream": True, "ignore_eos": True}) as r:
        got = 0
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                got += 1
            if got >= 2:
                break
    deadline = time.time() + 60
    while time.time() < deadline:
        if metric(server, "vllm:num_requests_running") == 0 and metric(server, "vllm:kv_cache_usage_perc") == 0:
            break
        time.sleep(0.3)
    assert metric(server, "vllm:num_requests_running") == 0
    assert metric(server, "vllm:kv_cache_usage_perc") == 0


def test_32_concurrent_streams(server, client):
    prompts = [f"Question {i}: what is {i} plus {i}?" for i in range(32)]
    want = client.completions.create(model=MODEL_NAME, prompt=prompts, max_tokens=8, temperature=0)
    want_text = {c.index: c.text for c in want.choices}
    want_finish = {c.index: c.finish_reason for c in want.choices}

    def stream_one(i):
        s = openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=600, max_retries=0)
        out = s.completions.create(model=MODEL_NAME, prompt=prompts[i], max_tokens=8, temperature=0, stream=True)
        text, finish = "", None
        for chunk in out:
            for ch in chunk.choices:
                text += ch.text
                finish = ch.finish_reason or finish
        return i, text, finish

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(stream_one, range(32)))
    for i, text, finish in results:
        assert finish == want_finish[i], (i, finish)
        assert text == want_text[i], (i, text, want_text[i])
    assert metric(server, "vllm:time_to_first_token_seconds_count") >= 32
    # Time to first token counts from submission: real prefills take measurable time.
    assert metric(server, "vllm:time_to_first_token_seconds_sum") > 0.01
    # The non-streamed batch and the 32 streams generated the same tokens.
    assert metric(server, "vllm:generation_tokens_total") >= 2 * want.usage.completion_tokens
