"""The official OpenAI Python SDK, unmodified, against a real `pagoda serve` on the default model.

Run by scripts/test (which builds the binary and installs the pinned SDK into a venv):
    PAGODA_BIN=target/debug/pagoda .venv-test/bin/pytest tests/sdk
"""
import os
import socket
import subprocess
import time
import urllib.request

import openai
import pytest

MODEL = "SmolLM2-135M-Instruct"
API_KEY = "sdk-test-key"
ADAPTER = "signature"
ADAPTER_DIR = os.path.join(os.path.dirname(__file__), "..", "fixtures", "demo-lora", "signature")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url():
    binary = os.environ.get("PAGODA_BIN", "target/debug/pagoda")
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "serve", "--port", str(port), "--api-key", API_KEY, "--dequantize",
         "--lora", f"{ADAPTER}={ADAPTER_DIR}"],
        env={**os.environ, "RUST_LOG": "warn"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("pagoda serve did not become healthy")
        time.sleep(0.2)
    yield url + "/v1"
    proc.terminate()
    assert proc.wait(timeout=60) == 0, "graceful shutdown exits 0"


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=base_url, api_key=API_KEY, max_retries=0)


QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_streaming(client):
    full = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=32, temperature=0)
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=32, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, reasons = "", None, []
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                reasons.append(c.finish_reason)
    assert text == full.choices[0].message.content
    assert reasons == ["stop"]
    assert usage.completion_tokens == full.usage.completion_tokens


def test_completions_and_models(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert "Paris" in r.choices[0].text
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL, ADAPTER]
    assert models[1].model_extra["parent"] == MODEL


def test_lora_adapter_by_model_field(client):
    q = [{"role": "user", "content": "What do bees make?"}]
    r = client.chat.completions.create(model=ADAPTER, messages=q, max_tokens=64, temperature=0)
    assert r.model == ADAPTER
    assert r.choices[0].message.content.rstrip().endswith("-- answered by Pagoda")
    base = client.chat.completions.create(model=MODEL, messages=q, max_tokens=64, temperature=0)
    assert "answered by Pagoda" not in base.choices[0].message.content


def test_logprobs_and_n(client):
    r = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=4, n=2, temperature=0.8, seed=3,
        logprobs=True, top_logprobs=2,
    )
    assert len(r.choices) == 2
    for c in r.choices:
        assert len(c.logprobs.content) == 4
        assert all(len(t.top_logprobs) == 2 for t in c.logprobs.content)


def test_bad_request_is_typed_with_our_message(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=-1)
    assert "temperature" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=100000)
    assert "8192" in str(e.value)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert "gpt-4o" in str(e.value)


def test_wrong_key_is_authentication_error(base_url):
    bad = openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=2)
