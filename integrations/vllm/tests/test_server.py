"""The OpenAI-compatible server with the plugin, on 127.0.0.1: chat completions with a base64 image.

Server default (``--mm-processor-kwargs``): evocut, 36 tokens per image; requests override it per request
(``--trust-request-mm-kwargs``). Bad settings are 400 answers and the server keeps serving. The server is started
as a child process of this test and stopped by its process id.
"""

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from helpers import ARCH, DEFAULT_MODEL, ENGINE, TOKENS, engine_env
from PIL import Image

STARTUP_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the engine process it started goes with it
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(DEFAULT_MODEL),
        "--served-model-name",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps({"architectures": [ARCH]}),
        "--mm-processor-kwargs",
        json.dumps({"tokensieve_method": "evocut", "tokensieve_budget": 36}),
        "--trust-request-mm-kwargs",
        "--max-model-len",
        str(ENGINE["max_model_len"]),
        "--max-num-seqs",
        str(ENGINE["max_num_seqs"]),
        "--enforce-eager",
        "--dtype",
        ENGINE["dtype"],
        "--seed",
        str(ENGINE["seed"]),
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=engine_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {STARTUP_S} s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        yield url, proc
    finally:
        _stop(proc)
    assert proc.poll() is not None


def chat(url: str, image: Image.Image, question: str, **extra) -> tuple[int, dict]:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    body = {
        "model": "tiny",
        "max_tokens": 6,
        "temperature": 0.0,
        "messages": [
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()},
                    },
                    {"type": "text", "text": question},
                ],
            }
        ],
        **extra,
    }
    req = urllib.request.Request(
        url + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _question(prompt: str) -> str:
    return prompt.split("<image>", 1)[1].rsplit("assistant", 1)[0].strip()


def test_chat_completion_with_per_request_budget(server, reference, ref_dir):
    from transformers import AutoTokenizer

    url, _ = server
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    case = reference["cases"][0]
    image = Image.open(ref_dir / case["image"]).convert("RGB")
    q = _question(case["prompt"])
    status, default = chat(url, image, q)
    assert status == 200, default
    status, off = chat(url, image, q, mm_processor_kwargs={"tokensieve_method": "none"})
    assert status == 200, off
    status, small = chat(url, image, q, mm_processor_kwargs={"tokensieve_budget": 16})
    assert status == 200, small
    # text + k tokens per image: the server default (36), the stock grid (144), and the request's own budget (16)
    text = off["usage"]["prompt_tokens"] - TOKENS
    assert text > 0
    assert default["usage"]["prompt_tokens"] == text + 36
    assert small["usage"]["prompt_tokens"] == text + 16
    # the answer is the Sieve path's answer for evocut at 16 tokens (and stock's with selection off)
    want = tok.decode(reference["sieve"]["evocut"]["16"][0]["tokens"], skip_special_tokens=True)
    assert small["choices"][0]["message"]["content"].strip() == want.strip()
    want = tok.decode(reference["vanilla"][0]["tokens"], skip_special_tokens=True)
    assert off["choices"][0]["message"]["content"].strip() == want.strip()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tokensieve_method": "nope"}, "unknown method"),
        ({"tokensieve_budget": 0}, "at least one token"),
        ({"tokensieve_budget": TOKENS + 1}, "exceeds"),
        ({"tokensieve_budget": "64"}, "must be an int"),
        ({"tokensieve_budget": 2.5}, "keep ratio"),
        ({"tokensieve_method": "fastv"}, "in-LLM"),
        ({"tokensieve_method": "todre"}, "relevance"),
        ({"tokensieve_params": {"layer": 99}, "tokensieve_method": "fastervlm"}, "fastervlm layer=99 must be in"),
    ],
)
def test_bad_settings_are_400_and_the_server_keeps_serving(server, reference, ref_dir, kwargs, match):
    url, proc = server
    case = reference["cases"][1]
    image = Image.open(ref_dir / case["image"]).convert("RGB")
    status, body = chat(url, image, _question(case["prompt"]), mm_processor_kwargs=kwargs)
    assert status == 400, body
    assert match in json.dumps(body)
    status, body = chat(url, image, _question(case["prompt"]), mm_processor_kwargs={"tokensieve_budget": 8})
    assert status == 200, body
    assert proc.poll() is None
