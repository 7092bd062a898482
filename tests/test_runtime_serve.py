"""`python3 -m edgepack_runtime serve`: the OpenAI-compatible endpoint of a decoder bundle, started
from the bundle folder as on a device and spoken to over real HTTP on loopback (http.client).
Answers are compared with the runtime's own Python API on the same bundle; a bounded load test
mixes good and malformed requests from eight threads."""

from __future__ import annotations

import http.client
import importlib.util
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from decoder_factory import build_chat_decoder

from edgepack.bundle import verify_bundle

CHAT = [{"role": "user", "content": "the dog"}]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_decoder(tmp_path_factory.mktemp("serve-bundle"))


@pytest.fixture(scope="module")
def runtime(bundle: Path) -> Any:
    spec = importlib.util.spec_from_file_location("serve_runtime", bundle / "edgepack_runtime.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model(bundle: Path, runtime: Any) -> Any:
    return runtime.Model(bundle)


def start_server(bundle: Path, *flags: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepack_runtime", "serve", "--port", "0", *flags],
        cwd=bundle, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    line = proc.stdout.readline()
    assert line.startswith("serving chatty-arm64 on http://127.0.0.1:"), (line, proc.stderr.read())
    return proc, int(line.rsplit(":", 1)[1].split("/")[0])


def stop_server(proc: subprocess.Popen) -> str:
    proc.terminate()
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return err


@pytest.fixture(scope="module")
def server(bundle: Path) -> Any:
    proc, port = start_server(bundle, "--queue", "16", "--max-tokens", "32")
    yield port
    err = stop_server(proc)
    assert "Traceback" not in err, err


def request(
    port: int, method: str, path: str, body: Any = None, raw: bytes | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def read_all(sock: socket.socket) -> str:
    """Everything the server sends until it closes the connection (it answers HTTP/1.0)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks).decode()


def post(port: int, path: str, body: Any) -> tuple[int, Any]:
    status, data = request(port, "POST", path, body)
    return status, json.loads(data)


def events(data: bytes) -> list[Any]:
    """The Server-Sent Events of a streamed answer: JSON chunks, then the [DONE] marker."""
    text = data.decode("utf-8")
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [json.loads(b[6:]) for b in blocks[:-1]]


def test_models_completions_and_chat_answer_as_the_runtime_does(server: int, model: Any) -> None:
    status, data = request(server, "GET", "/v1/models")
    assert status == 200
    assert json.loads(data)["data"] == [
        {"id": "chatty-arm64", "object": "model", "created": 0, "owned_by": "edgepack"}
    ]
    status, body = post(
        server, "/v1/completions", {"model": "x", "prompt": "the cat", "max_tokens": 8}
    )
    assert status == 200, body
    assert body["object"] == "text_completion" and body["model"] == "chatty-arm64"
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["text"] == model.generate("the cat", 8) and choice["text"]
    assert choice["finish_reason"] == "length"
    prompt_tokens = len(model.tokenizer.encode("the cat").ids)
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 8,
                             "total_tokens": prompt_tokens + 8}  # fmt: skip
    status, body = post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6})
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": model.chat(CHAT, 6)}
    assert body["usage"]["prompt_tokens"] == len(model.chat_ids(CHAT))
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "the "}, {"type": "text", "text": "dog"}],
        }
    ]
    status, same = post(server, "/v1/chat/completions", {"messages": parts, "max_tokens": 6})
    assert status == 200 and same["choices"][0]["message"] == choice["message"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_chunks_reassemble_to_the_whole_answer(server: int, path: str) -> None:
    chat = path.endswith("chat/completions")
    body = {"max_tokens": 12, "temperature": 1.3, "top_p": 0.9, "seed": 21, "stop": ["@@"]}
    body.update({"messages": CHAT} if chat else {"prompt": "a dog and a bird"})
    status, whole = post(server, path, body)
    assert status == 200, whole
    status, data = request(server, "POST", path, {**body, "stream": True})
    assert status == 200
    chunks = events(data)
    assert len({c["id"] for c in chunks}) == 1
    assert all(
        c["object"] == ("chat.completion.chunk" if chat else "text_completion") for c in chunks
    )
    if chat:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        want = whole["choices"][0]["message"]["content"]
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks)
        want = whole["choices"][0]["text"]
    assert text == want and text
    assert len(chunks) > 3  # piece by piece, not one block
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["usage"] == whole["usage"]
    sampled = [post(server, path, {**body, "seed": s})[1]["choices"][0] for s in range(3)]
    assert len({json.dumps(c) for c in sampled}) > 1  # the seed is used, not ignored


BAD = [
    (b"{", 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"\xff\xfe", 400, "not valid JSON"),
    (b"[" * 100_000 + b"]" * 100_000, 400, "not valid JSON"),
    (json.dumps({"prompt": 5}).encode(), 400, "prompt must be a string"),
    (json.dumps({"prompt": "a", "max_tokens": -1}).encode(), 400, "max_tokens must be 0 to 32"),
    (json.dumps({"prompt": "a", "max_tokens": 33}).encode(), 400, "max_tokens must be 0 to 32"),
    (json.dumps({"prompt": "a", "max_tokens": "9"}).encode(), 400, "max_tokens must be an integer"),
    (
        json.dumps({"prompt": "a", "temperature": "hot"}).encode(),
        400,
        "temperature must be a number",
    ),
    (json.dumps({"prompt": "a", "temperature": -2}).encode(), 400, "temperature must be at least"),
    (json.dumps({"prompt": "a", "top_p": 0}).encode(), 400, "top_p must be above 0.0"),
    (json.dumps({"prompt": "a", "stop": 3}).encode(), 400, "stop must be a string or a list"),
    (json.dumps({"prompt": "a", "stop": ["a"] * 5}).encode(), 400, "up to 4 strings"),
    (json.dumps({"prompt": "a", "stream": "yes"}).encode(), 400, "stream must be true or false"),
    (json.dumps({"prompt": "a", "n": 2}).encode(), 400, "n must be 1"),
    (json.dumps({"prompt": "a", "seed": True}).encode(), 400, "seed must be an integer"),
    (json.dumps({"prompt": " ".join(["cat"] * 70)}).encode(), 400, "longer than the context (64)"),
]
BAD_CHAT = [
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": "hi"}, "messages must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, "needs a string role and content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "must be text parts"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role 'tool'"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
     "last message must be the user's"),
]  # fmt: skip


def test_bad_requests_get_an_openai_error_and_the_server_goes_on(server: int) -> None:
    for raw, status, words in BAD:
        got, data = request(server, "POST", "/v1/completions", raw=raw)
        error = json.loads(data)["error"]
        assert (got, error["type"]) == (status, "invalid_request_error"), (raw[:60], data)
        assert words in error["message"], (raw[:60], error)
    for body, words in BAD_CHAT:
        got, answer = post(server, "/v1/chat/completions", body)
        assert got == 400 and words in answer["error"]["message"], (body, answer)
    for method, path in (("GET", "/v1/nothing"), ("POST", "/v2/completions"), ("GET", "/")):
        got, data = request(server, method, path, {} if method == "POST" else None)
        assert got == 404 and json.loads(data)["error"]["type"] == "not_found_error"
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def test_size_limits_missing_lengths_and_silent_clients(server: int) -> None:
    """A body over the limit is refused from its Content-Length, before it is read; a request
    without a length is a 400; a client that connects and says nothing holds only its own
    connection."""
    silent = socket.create_connection(("127.0.0.1", server), timeout=10)
    half = socket.create_connection(("127.0.0.1", server), timeout=10)
    half.sendall(b'POST /v1/completions HTTP/1.1\r\nContent-Length: 500\r\n\r\n{"prompt"')
    try:
        with socket.create_connection(("127.0.0.1", server), timeout=10) as big:
            big.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n"
            )
            answer = big.recv(65536).decode()
        assert answer.startswith("HTTP/1.0 413"), answer
        assert "the limit is 1048576" in answer
        with socket.create_connection(("127.0.0.1", server), timeout=10) as bare:
            bare.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_all(bare)
        assert answer.startswith("HTTP/1.0 400") and "Content-Length" in answer, answer
        assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    finally:
        silent.close()
        half.close()


def test_a_client_that_leaves_mid_stream_frees_the_model(server: int) -> None:
    body = {"prompt": "the cat", "max_tokens": 32, "stream": True}
    for _ in range(3):
        conn = socket.create_connection(("127.0.0.1", server), timeout=10)
        data = json.dumps(body).encode()
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                     % (len(data), data))  # fmt: skip
        assert conn.recv(64).startswith(b"HTTP/1.0 200")
        conn.close()
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def one_request(port: int, i: int) -> tuple[bool, int, str]:
    """Request i of the load test: every fifth malformed (bad JSON, a wrong type, a wrong path);
    the others alternate completions and chat, some streamed."""
    rng = random.Random(i)
    if i % 5 == 0:
        kind = i // 5 % 3
        if kind == 0:
            status, data = request(port, "POST", "/v1/completions", raw=b'{"prompt": ')
        elif kind == 1:
            status, data = request(
                port, "POST", "/v1/chat/completions", {"messages": [{"role": 1}]}
            )
        else:
            status, data = request(port, "POST", "/v1/embeddings", {"input": "x"})
        return False, status, json.loads(data)["error"]["message"]
    chat, stream = i % 2 == 0, i % 3 == 0
    body = {"max_tokens": rng.randint(1, 4), "stream": stream, "temperature": 0.8, "seed": i}
    body.update({"messages": CHAT} if chat else {"prompt": rng.choice(["the cat", "a dog", "red"])})
    status, data = request(
        port, "POST", "/v1/chat/completions" if chat else "/v1/completions", body
    )
    if status != 200:
        return True, status, data.decode()[:200]
    if stream:
        pieces = events(data)
        text = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content", "")
                       for c in pieces)  # fmt: skip
    else:
        answer = json.loads(data)["choices"][0]
        text = answer["message"]["content"] if chat else answer["text"]
    return True, status, text


def test_eight_clients_two_hundred_requests_a_fifth_malformed(server: int) -> None:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: one_request(server, i), range(200)))
    elapsed = time.perf_counter() - start
    assert len(results) == 200
    good = [r for r in results if r[0]]
    bad = [r for r in results if not r[0]]
    assert len(good) == 160 and len(bad) == 40
    assert Counter(r[1] for r in good) == {200: 160}, [r for r in good if r[1] != 200][:3]
    assert all(isinstance(r[2], str) for r in good)
    assert sum(bool(r[2]) for r in good) > 150  # a 1-token reply can be one skipped [SEP]
    # Bad JSON 14 times and a wrong role 13 times (400), a path that is not served 13 times (404).
    assert Counter(r[1] for r in bad) == {400: 27, 404: 13}, bad[:3]
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    assert elapsed < 120, elapsed


def test_a_full_queue_is_told_429_at_once(bundle: Path, model: Any, runtime: Any) -> None:
    """One generation runs at a time; with no queue, a request that arrives while one holds the
    model is refused with 429 and a JSON error, and the waiting one is answered afterwards."""
    serve = importlib.util.spec_from_file_location("serve_module", bundle / "edgepack_serve.py")
    module = importlib.util.module_from_spec(serve)
    serve.loader.exec_module(module)
    server = module.make_server(model, port=0, queue=0, max_tokens=8)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    admission = server.RequestHandlerClass.app.admission
    try:
        admission.turn.acquire()  # the model is busy
        first: list = []
        body = {"prompt": "the cat", "max_tokens": 3}
        waiter = threading.Thread(target=lambda: first.append(post(port, "/v1/completions", body)))
        waiter.start()
        for _ in range(500):  # until the first request holds the only slot
            if not admission.slots.acquire(blocking=False):
                break
            admission.slots.release()
            time.sleep(0.01)
        status, answer = post(port, "/v1/completions", body)
        assert status == 429 and answer["error"]["type"] == "rate_limit_error", answer
        assert "queue is full" in answer["error"]["message"]
        assert not first
        admission.turn.release()
        waiter.join(timeout=60)
        assert first and first[0][0] == 200
        assert first[0][1]["choices"][0]["text"] == model.generate("the cat", 3)
    finally:
        if admission.turn.locked():
            admission.turn.release()
        server.shutdown()
        server.server_close()


def test_serve_flags_and_ports_are_checked(bundle: Path) -> None:
    for flags, words in (
        (["--port", "70000"], "--port must be at least 0"),
        (["--queue", "-1"], "--queue must be at least 0"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ):
        done = subprocess.run([sys.executable, "-m", "edgepack_runtime", "serve", *flags],
                              cwd=bundle, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 2 and words in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        done = subprocess.run([sys.executable, "-m", "edgepack_runtime", "serve", "--port", port],
                              cwd=bundle, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_serving_leaves_the_bundle_verifiable(bundle: Path, server: int) -> None:
    assert post(server, "/v1/completions", {"prompt": "a", "max_tokens": 1})[0] == 200
    assert not (bundle / "__pycache__").exists()
    assert verify_bundle(bundle) >= 6
