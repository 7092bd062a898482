"""An OpenAI-compatible HTTP endpoint for a decoder bundle, on the standard library alone.

Started by ``python3 -m edgepack_runtime serve --port 8000`` in the bundle folder (Python 3.8+,
onnxruntime, numpy, tokenizers; no web framework). It listens on loopback unless told otherwise:
there is no authentication, so exposing it is the app's decision.

- ``POST /v1/completions``: ``prompt`` (a string, or a list of one), ``max_tokens`` (default 16).
- ``POST /v1/chat/completions``: ``messages`` rendered with the bundle's chat format.
- ``GET /v1/models``: the one model.

Both POSTs take ``temperature`` (default 0: greedy, the path the device check runs), ``top_p``,
``seed``, ``stop`` (a string or up to 4), ``stream`` (Server-Sent Events: ``data: {...}`` chunks,
then ``data: [DONE]``), and the extensions ``top_k`` and ``repetition_penalty``. ``n`` must be 1.
Other fields an OpenAI client sends (``user``, ``presence_penalty``, ...) are ignored.

The model runs one generation at a time. Requests wait in a bounded queue for their turn; beyond
it the answer is 429 at once, so a client can back off rather than pile up. A body over the size
limit is 413 before it is read; bad JSON, wrong types or values 400; unknown paths 404; errors
come as OpenAI's ``{"error": {"message", "type", "param", "code"}}``. A socket timeout bounds how
long a slow or silent client can hold its connection.
"""

import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Tuple

# OpenAI's own limit on stop sequences.
MAX_STOPS = 4
SOCKET_TIMEOUT_S = 30.0


class RequestError(Exception):
    """A request the server refuses: HTTP status, message and the offending field."""

    def __init__(self, status: int, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def error_body(status: int, message: str, param: Optional[str] = None) -> Dict[str, Any]:
    kind = {
        400: "invalid_request_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class Admission:
    """At most one generation running and ``queue`` waiting; a request beyond is turned away.

    ``slots`` counts running plus waiting requests and is taken without blocking (a refusal is
    immediate); ``turn`` is the one running generation's lock, held for all of it, streamed or
    not."""

    def __init__(self, queue: int) -> None:
        self.slots = threading.BoundedSemaphore(queue + 1)
        self.turn = threading.Lock()

    def enter(self) -> bool:
        return self.slots.acquire(blocking=False)

    def leave(self) -> None:
        self.slots.release()


def _number(body: Dict[str, Any], name: str, integral: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integral else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise RequestError(
            400, "{} must be {}".format(name, "an integer" if integral else "a number"), name
        )
    return value


def parse_options(body: Dict[str, Any], max_tokens: int) -> Dict[str, Any]:
    """The generation options of a completions or chat request; RequestError for a bad one.
    ``max_new_tokens`` is None when the request names none."""
    n = _number(body, "n", integral=True)
    if n not in (None, 1):
        raise RequestError(400, "n must be 1: this server makes one choice per request", "n")
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    tokens = _number({"max_tokens": tokens}, "max_tokens", integral=True)
    if tokens is not None and not 0 <= tokens <= max_tokens:
        raise RequestError(
            400, "max_tokens must be 0 to {} on this server, got {}".format(max_tokens, tokens),
            "max_tokens",
        )  # fmt: skip
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if stops is not None and (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) for s in stops)
    ):
        raise RequestError(
            400, "stop must be a string or a list of up to {} strings".format(MAX_STOPS), "stop"
        )
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "stream must be true or false", "stream")
    options = {
        "max_new_tokens": tokens,
        "stop": stops,
        "stream": stream,
        "seed": _number(body, "seed", integral=True),
        "top_k": _number(body, "top_k", integral=True),
    }
    for name in ("temperature", "top_p", "repetition_penalty"):
        options[name] = _number(body, name)
    return options


def parse_messages(body: Dict[str, Any]) -> List[Dict[str, str]]:
    """``messages`` with string contents; a list of text parts (the newer OpenAI form) is joined."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(400, "messages[{}] must be an object".format(i), "messages")
        content = message.get("content")
        if isinstance(content, list):
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if len(parts) != len(content) or not all(isinstance(t, str) for t in parts):
                raise RequestError(
                    400, "messages[{}].content parts must be text parts".format(i), "messages"
                )
            content = "".join(parts)
        role = message.get("role")
        if not isinstance(content, str) or not isinstance(role, str):
            raise RequestError(
                400, "messages[{}] needs a string role and content".format(i), "messages"
            )
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


def parse_prompt(body: Dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise RequestError(400, "prompt must be a string (or a list of one string)", "prompt")
    return prompt


class App:
    """What the handler threads share: the model, the admission and the limits."""

    def __init__(
        self, model: Any, name: str, queue: int, max_tokens: int, max_body: int, log: bool
    ) -> None:
        self.model, self.name, self.max_tokens, self.max_body = model, name, max_tokens, max_body
        self.admission, self.log = Admission(queue), log
        self.errors = model.Error

    def start(self, chat: bool, body: Dict[str, Any]) -> Tuple[Any, Dict[str, Any]]:
        """The generation a request asks for (not started) and its options; RequestError when
        the model refuses it (a prompt too long, a bad sampling value, no chat format)."""
        options = parse_options(body, self.max_tokens)
        stream = options.pop("stream")
        tokens = options.pop("max_new_tokens")
        try:
            if chat:
                ids = self.model.chat_ids(parse_messages(body))
                stops = self.model.end_of_turn
            else:
                ids, stops = self.model.tokenizer.encode(parse_prompt(body)).ids, []
            if tokens is None:
                # OpenAI's defaults: 16 for completions, the rest of the context for chat (here
                # bounded by the server's limit).
                room = max(0, self.model.max_length - len(ids))
                tokens = min(16 if not chat else room, room, self.max_tokens)
            generation = self.model.start(ids, tokens, stop_ids=stops, **options)
        except self.errors as exc:
            raise RequestError(400, str(exc)) from None
        return generation, {"stream": stream}


class Handler(BaseHTTPRequestHandler):
    server_version = "edgepack-serve"
    protocol_version = "HTTP/1.0"  # one request per connection: a stream ends when it closes
    timeout = SOCKET_TIMEOUT_S
    # Headers and body leave in one send (and each SSE event when flushed): written apart, the
    # body could still wait behind Nagle's algorithm when the connection closed, and a client
    # then saw the headers of a 413 and no body (seen under load in the tests).
    wbufsize = -1
    disable_nagle_algorithm = True
    app = None  # type: Any  # set on the class make_server returns

    def log_message(self, format: str, *args: Any) -> None:
        if self.app.log:
            sys.stderr.write("%s %s\n" % (self.address_string(), format % args))

    def _json(self, status: int, body: Dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _error(self, status: int, message: str, param: Optional[str] = None) -> None:
        self.close_connection = True
        self._json(status, error_body(status, message, param))

    def do_GET(self) -> None:
        if self.path.split("?")[0].rstrip("/") == "/v1/models":
            model = {"id": self.app.name, "object": "model", "created": 0, "owned_by": "edgepack"}
            self._json(200, {"object": "list", "data": [model]})
        else:
            self._error(404, "no such path: GET {}".format(self.path[:200]))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            return self._error(404, "no such path: POST {}".format(self.path[:200]))
        try:
            body = self._body()
            generation, how = self.app.start(path.endswith("chat/completions"), body)
        except RequestError as exc:
            return self._error(exc.status, exc.message, exc.param)
        if not self.app.admission.enter():
            generation.close()
            return self._error(429, "the server is busy: one generation runs and the queue is full")
        try:
            with self.app.admission.turn:
                self._answer(path.endswith("chat/completions"), generation, how["stream"])
        except (BrokenPipeError, ConnectionResetError):  # the client left; nothing to tell it
            self.close_connection = True
        finally:
            generation.close()
            self.app.admission.leave()

    def _body(self) -> Dict[str, Any]:
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(400, "a JSON body with a Content-Length header is required")
        if int(length) > self.app.max_body:
            raise RequestError(
                413, "the body is {} bytes; the limit is {}".format(int(length), self.app.max_body)
            )
        raw = self.rfile.read(int(length))
        if len(raw) < int(length):
            raise RequestError(400, "the body ended before its Content-Length")
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the body must be a JSON object")
        return body

    def _answer(self, chat: bool, generation: Any, stream: bool) -> None:
        head = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.app.name,
        }
        if not stream:
            text = "".join(generation)
            choice = {"index": 0, "finish_reason": generation.finish_reason}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice.update(text=text, logprobs=None)
            return self._json(200, {**head, "choices": [choice], "usage": _usage(generation)})
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.wfile.flush()  # the client knows the stream started before the first token
        head["object"] = "chat.completion.chunk" if chat else "text_completion"
        if chat:
            self._event({**head, "choices": [_delta({"role": "assistant", "content": ""})]})
        for piece in generation:
            choice = _delta({"content": piece}) if chat else _text(piece)
            self._event({**head, "choices": [choice]})
        last = _delta({}) if chat else _text("")
        last["finish_reason"] = generation.finish_reason
        self._event({**head, "choices": [last], "usage": _usage(generation)})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, chunk: Dict[str, Any]) -> None:
        self.wfile.write(
            b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n"
        )
        self.wfile.flush()


def _delta(delta: Dict[str, Any]) -> Dict[str, Any]:
    return {"index": 0, "delta": delta, "finish_reason": None}


def _text(piece: str) -> Dict[str, Any]:
    return {"index": 0, "text": piece, "logprobs": None, "finish_reason": None}


def _usage(generation: Any) -> Dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


class Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client never keeps the process from exiting

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A handler that failed past its own answers (a socket timeout mid-read, ...): one line,
        # not http.server's traceback, and the connection is closed by the caller.
        exc = sys.exc_info()[1]
        sys.stderr.write("edgepack_serve: {}: {}\n".format(client_address[0], exc))


def make_server(
    model: Any,
    host: str = "127.0.0.1",
    port: int = 8000,
    queue: int = 8,
    max_tokens: int = 512,
    max_body: int = 1 << 20,
    name: Optional[str] = None,
    log: bool = False,
) -> Server:
    """A server bound to (host, port) and not yet serving: call ``serve_forever``
    (``server_address[1]`` is the port, when 0 asked for any free one)."""
    app = App(model, name or model.bundle.name, queue, max_tokens, max_body, log)
    handler = type("BundleHandler", (Handler,), {"app": app})
    return Server((host, port), handler)


def serve(model: Any, args: Any) -> int:
    """The ``serve`` command: bind, print the address, serve until interrupted."""
    errors = model.Error
    for flag, value, low in (
        ("--port", args.port, 0),
        ("--queue", args.queue, 0),
        ("--max-tokens", args.max_tokens, 1),
        ("--max-body", args.max_body, 1),
    ):
        if value < low or (flag == "--port" and value > 65535):
            raise errors("{} must be at least {}, got {}".format(flag, low, value))
    try:
        server = make_server(
            model, args.host, args.port, args.queue, args.max_tokens, args.max_body,
            args.model_name, args.log,
        )  # fmt: skip
    except OSError as exc:
        raise errors("cannot listen on {}:{}: {}".format(args.host, args.port, exc)) from None
    host, port = server.server_address[:2]
    sys.stdout.write("serving {} on http://{}:{}/v1\n".format(server_name(server), host, port))
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def server_name(server: Server) -> str:
    return server.RequestHandlerClass.app.name
