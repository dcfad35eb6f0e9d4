"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

It stands in for a hosted API at the network edge: the generator talks to it over HTTP with the
official client, exactly as it talks to api.openai.com or ``vllm serve``. Its answers are a
deterministic function of the prompt (the quoted text, words reversed, plus a tag hashed from the
prompt; some wrapped as ``Paraphrase: "..."`` so cleaning is exercised). It can be told to
misbehave: a fixed latency, and a queue of faults for the next requests (``429`` with Retry-After,
``500``, ``400`` (a request refused for good), ``malformed`` 200 bodies, ``slow`` replies, ``refusal``, ``empty``), plus refusals for
prompts containing given texts. It counts requests and reports ``usage`` tokens.

    python -m paraclip_plugin.paraphrase.local_server --port 8000 --latency 0.2
"""
import argparse
import collections
import hashlib
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


def quoted_text(prompt):
    """The text between the first and last double quote of the prompt (the paper's prompts quote it)."""
    first, last = prompt.find('"'), prompt.rfind('"')
    return prompt[first + 1:last] if 0 <= first < last else prompt


def raw_reply(prompt):
    """What the server answers for ``prompt``: deterministic, different for step 1 and step 2."""
    digest = hashlib.sha1(prompt.encode()).hexdigest()
    body = " ".join(reversed(quoted_text(prompt).split())) + f" v{digest[:4]}"
    return f'Paraphrase: "{body}"' if int(digest[4], 16) % 2 else body


class LocalChatServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of connections arrive at once at --concurrency 256

    def __init__(self, port=0, latency=0.0, retry_after="0.05", slow_seconds=5.0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.latency = latency
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        self.faults = collections.deque()
        self.refuse = {}  # text -> how many more times to refuse prompts containing it
        self.requests = 0
        self.log = []  # (time, prompt, outcome) per chat request
        self.authorizations = set()
        self._thread = None

    def handle_error(self, request, client_address):
        # A client that timed out closed its socket before a slow reply: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def inject(self, *faults):
        """Queue faults for the next requests, in order: '429', '500', '400', 'malformed', 'slow', 'refusal', 'empty'."""
        with self.lock:
            self.faults.extend(faults)

    def refuse_text(self, text, times=1):
        with self.lock:
            self.refuse[text] = times

    def prompts(self, outcome="ok"):
        with self.lock:
            return [p for _, p, o in self.log if o == outcome]

    def start(self):
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self.shutdown()
        self.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _decide(self, prompt):
        with self.lock:
            self.requests += 1
            fault = self.faults.popleft() if self.faults else None
            if fault is None:
                for text, times in self.refuse.items():
                    if times > 0 and text in prompt:
                        self.refuse[text] = times - 1
                        fault = "refusal"
                        break
            self.log.append((time.monotonic(), prompt, fault or "ok"))
        return fault


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, *args):  # quiet: tests and benchmarks read their own output
        pass

    def _send(self, status, body, headers=()):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/").endswith("/models"):
            return self._send(200, {"object": "list", "data": [{"id": "local-paraphraser", "object": "model"}]})
        self._send(404, {"error": {"message": "not found"}})

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if not self.path.rstrip("/").endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        with server.lock:
            server.authorizations.add(self.headers.get("Authorization", ""))
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user")
        fault = server._decide(prompt)
        time.sleep(server.slow_seconds if fault == "slow" else server.latency)
        if fault == "429":
            return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                              [("Retry-After", server.retry_after)])
        if fault == "400":
            return self._send(400, {"error": {"message": "content policy", "type": "invalid_request_error"}})
        if fault == "500":
            return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
        if fault == "malformed":
            return self._send(200, b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess')
        content = {"refusal": REFUSAL_TEXT, "empty": ""}.get(fault, raw_reply(prompt))
        self._send(200, {
            "id": "chatcmpl-local",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", "local"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": len(prompt.split()), "completion_tokens": len(content.split()),
                      "total_tokens": len(prompt.split()) + len(content.split())},
        })


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on start)")
    parser.add_argument("--latency", type=float, default=0.2, help="seconds each reply takes")
    args = parser.parse_args(argv)
    server = LocalChatServer(args.port, args.latency)
    print(server.base_url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
