"""Shared fixtures: a running `vllm-apple serve` on the embedded default model
(SmolLM2-135M-Instruct, fetched by scripts/fetch-assets.sh) and an OpenAI client for it."""
import os
import pathlib
import socket
import subprocess
import time

import httpx
import openai
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL = ROOT / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
BINARY = ROOT / "target" / "release" / "vllm-apple"
API_KEY = "test-key"
MODEL_NAME = "smollm2"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    port = free_port()
    env = dict(os.environ)
    env.setdefault("WGPU_BACKEND", "vulkan")
    proc = subprocess.Popen(
        [str(BINARY), "serve", str(MODEL), "--port", str(port), "--api-key", API_KEY,
         "--served-model-name", MODEL_NAME, "--max-model-len", "512", "--max-num-seqs", "48",
         "--num-gpu-blocks-override", "1024"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("server exited:\n" + proc.stdout.read())
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        proc.kill()
        raise RuntimeError("server did not come up")
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY, timeout=600, max_retries=0)


def metric(server, name):
    """The value of a Prometheus metric (summed over its label sets)."""
    text = httpx.get(server + "/metrics", timeout=10).text
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    return total
