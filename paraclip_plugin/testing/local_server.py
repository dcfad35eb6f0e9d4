"""A real OpenAI-compatible chat-completions server on 127.0.0.1, for tests and benchmarks.

It stands in for a hosted API at the network edge: the generator talks to it over HTTP with the
official client, exactly as it talks to api.openai.com or ``vllm serve``. Its answers are a
deterministic function of the prompt (the quoted text, words reversed, plus a tag hashed from the
prompt; some wrapped as ``Paraphrase: "..."`` so cleaning is exercised). It can be told to
misbehave the ways real servers do (see ``FAULTS``): a fixed latency; a queue of faults for the
next requests; refusals for prompts containing given texts; and whole-server modes: refusing
every request as OpenAI's reasoning models refuse ``max_tokens`` (``reject_max_tokens``) or as
``vllm serve`` refuses a model without a chat template (``no_chat_template``), and answering like a
reasoning model (``reasoning``: ``<think>...</think>`` before the answer); ``redirect_to``: a URL every
request is redirected to (HTTP 307, as a proxy or a moved endpoint answers). It counts requests, keeps each
request's JSON body (``bodies``), Authorization header and all its headers (``headers_seen``), and reports
``usage`` tokens.

The Batch API (``/v1/files``, ``/v1/batches``: create with ``metadata``, retrieve, list newest first with
``after``/``limit``/``has_more``, cancel, file content) runs each batch in a thread, answering every line as
``/chat/completions`` would, and has the real API's outcomes: per-line 400s (``flag_text``, OpenAI's
``invalid_prompt`` body) and 5xx (``fail_text``) in the error file; expired lines (``expire_next``:
``response: null``, ``error.code`` ``batch_expired``); a batch ``failed`` with ``errors.data[].code``
``token_limit_exceeded`` when the enqueued input tokens (the prompts' ``usage`` count) of the batches in flight would
pass ``enqueued_token_limit``; ``cancelled`` (``cancel``) with the lines answered before it in the output file; a
vanished batch or file (``forget``: 404 with OpenAI's body); ``retrieve`` outages (``retrieve_failures``: the next N
retrieves answer 500); a lost reply to ``POST /batches`` (``create_faults``: "drop" closes the connection, "500"
answers 500, each after the batch is created). ``pause_on`` = ``(kind, predicate)`` holds one request
("upload" before storing it, "create" after creating the batch, "content" before sending a file) until ``resume``
is set, with ``paused`` set meanwhile: a test kills the client at that moment.

    python -m paraclip_plugin.testing.local_server --port 8000 --latency 0.2
"""

import argparse
import collections
import email.parser
import email.policy
import hashlib
import itertools
import json
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."
FAULTS = {
    "429": "HTTP 429 with Retry-After: retry_after (seconds)",
    "429-long": "HTTP 429 with Retry-After: long_retry_after (above the client's 120 s cap)",
    "500": "HTTP 500",
    "400": "HTTP 400: this request refused for good (a content policy)",
    "malformed": "200, JSON content type, truncated JSON body",
    "html": "200 with Content-Type text/html (a proxy's page): the client returns the body as a str",
    "choices-dict": "200, valid JSON whose 'choices' is an object, not a list",
    "bad-utf8": "200, JSON content type, a body that is not UTF-8",
    "slow": "a reply after slow_seconds",
    "refusal": "200, the model declines in words",
    "empty": "200, empty content",
    "length": "200, content null, finish_reason 'length' (a reasoning model cut off by the token limit)",
    "content_filter": "200, content null, finish_reason 'content_filter'",
    "flagged": "HTTP 400 invalid_prompt: the prompt was flagged (OpenAI's body)",
}
# What the real services answer (bodies as OpenAI and vLLM's OpenAI-compatible server send them).
OPENAI_MAX_TOKENS_ERROR = {
    "error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
        "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error",
        "param": "max_tokens",
        "code": "unsupported_parameter",
    }
}
OPENAI_FLAGGED_ERROR = {
    "error": {
        "message": "Invalid prompt: your prompt was flagged as potentially violating our usage policy. Please try again "
        "with a different prompt.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_prompt",
    }
}
OPENAI_TOKEN_LIMIT_ERROR = {
    "code": "token_limit_exceeded",
    "line": None,
    "param": None,
    "message": "Enqueued token limit reached for local-paraphraser in organization org-local. Limit: {limit} enqueued "
    "tokens. Please try again once some in_progress batches have been completed.",
}
IN_FLIGHT = ("validating", "in_progress", "finalizing")
# the body of the API's HTTP 500
SERVER_ERROR = {
    "error": {
        "message": "The server had an error while processing your request.",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


def not_found(what, object_id):
    """OpenAI's 404 body for a batch or file it does not know (another key or project, or deleted)."""
    message = f"No batch found with id '{object_id}'." if what == "batch" else f"No such File object: {object_id}"
    return {"error": {"message": message, "type": "invalid_request_error", "param": "id", "code": None}}


VLLM_NO_TEMPLATE_ERROR = {
    "object": "error",
    "type": "BadRequestError",
    "param": None,
    "code": 400,
    "message": "As of transformers v4.44, default chat template is no longer allowed, so you must provide "
    "a chat template if the tokenizer does not define one.",
}


def quoted_text(prompt):
    """The text between the first and last double quote of the prompt (the paper's prompts quote it)."""
    first, last = prompt.find('"'), prompt.rfind('"')
    return prompt[first + 1 : last] if 0 <= first < last else prompt


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
        self.long_retry_after = "121"
        self.reject_max_tokens = False
        self.no_chat_template = False
        self.reasoning = False
        self.bodies = []  # JSON body of every chat request
        self.files, self.batches = {}, {}  # the Batch API's state: id -> record
        self._file_ids, self._batch_ids = itertools.count(1), itertools.count(1)  # ids are never reused
        self.batch_seconds = 0.0  # how long a batch stays in_progress
        self.held = set()  # ids of batches that stay in_progress until taken out (batches end at their own times)
        self.expire_next = 0  # the next batch's last N requests expire unanswered
        self.flag_text = set()  # prompts containing one of these are refused (400 invalid_prompt), every time
        self.fail_text = set()  # prompts containing one of these fail (500), every time
        self.enqueued_token_limit = None  # the organization's batch queue limit, in prompt tokens
        self.cancelled = set()  # ids of batches someone cancelled
        self.retrieve_failures = 0  # the next N GET /batches/{id} answer 500
        self.create_faults = collections.deque()  # "drop" / "500" for the next creates, after creating the batch
        self.pause_on = None  # (kind, predicate of the request's data or None)
        self.paused, self.resume = threading.Event(), threading.Event()
        self.slow_seconds = slow_seconds
        self.lock = threading.Lock()
        self.faults = collections.deque()
        self.refuse = {}  # text -> how many more times to refuse prompts containing it
        self.requests = 0
        self.log = []  # (time, prompt, outcome) per chat request
        self.authorizations = set()
        self.headers_seen = []  # every request's headers, names lower-cased
        self.redirect_to = None
        self._thread = None

    def handle_error(self, request, client_address):
        # A client that timed out closed its socket before a slow reply: expected, not worth a traceback.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    @property
    def base_url(self):
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def inject(self, *faults):
        """Queue faults (names in ``FAULTS``) for the next requests, in order."""
        unknown = [f for f in faults if f not in FAULTS]
        if unknown:
            raise ValueError(f"unknown faults {unknown}; choose from {sorted(FAULTS)}")
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

    def _decide(self, prompt, body):
        with self.lock:
            self.requests += 1
            self.bodies.append(body)
            fault = self.faults.popleft() if self.faults else None
            if self.no_chat_template:
                fault = "no-template"
            elif self.reject_max_tokens and "max_tokens" in body:
                fault = "max-tokens"
            if fault is None and any(text in prompt for text in self.flag_text):
                fault = "flagged"
            elif fault is None and any(text in prompt for text in self.fail_text):
                fault = "500"
            if fault is None:
                for text, times in self.refuse.items():
                    if times > 0 and text in prompt:
                        self.refuse[text] = times - 1
                        fault = "refusal"
                        break
            self.log.append((time.monotonic(), prompt, fault or "ok"))
        return fault

    def answer(self, body):
        """``(status, body bytes, content type, headers)`` for one chat-completions request body."""
        prompt = "\n".join(m.get("content", "") for m in body.get("messages", []) if m.get("role") == "user")
        fault = self._decide(prompt, body)
        time.sleep(self.slow_seconds if fault == "slow" else self.latency)
        errors = {
            "429": (429, {"error": {"message": "rate limited", "type": "rate_limit"}}),
            "429-long": (429, {"error": {"message": "quota window: retry later", "type": "rate_limit"}}),
            "400": (400, {"error": {"message": "content policy", "type": "invalid_request_error"}}),
            "500": (500, {"error": {"message": "internal error", "type": "server_error"}}),
            "max-tokens": (400, OPENAI_MAX_TOKENS_ERROR),
            "flagged": (400, OPENAI_FLAGGED_ERROR),
            "no-template": (400, VLLM_NO_TEMPLATE_ERROR),
        }
        if fault in errors:
            retry_after = {"429": self.retry_after, "429-long": self.long_retry_after}.get(fault)
            status, payload = errors[fault]
            headers = [("Retry-After", retry_after)] if retry_after else []
            return status, json.dumps(payload).encode(), "application/json", headers
        odd_bodies = {
            "malformed": (b'{"id": "chatcmpl-broken", "choices": [{"index": 0, "mess', "application/json"),
            "html": (b"<html><body><h1>200 OK</h1>upstream returned nothing</body></html>", "text/html"),
            "choices-dict": (
                json.dumps(
                    {"id": "chatcmpl-odd", "object": "chat.completion", "choices": {"0": {"message": {"content": "x"}}}}
                ).encode(),
                "application/json",
            ),
            "bad-utf8": (b'{"id": "chatcmpl-\xff\xfe", "choices": []}', "application/json"),
        }
        if fault in odd_bodies:
            data, content_type = odd_bodies[fault]
            return 200, data, content_type, []
        content = {"refusal": REFUSAL_TEXT, "empty": "", "length": None, "content_filter": None}.get(
            fault, raw_reply(prompt)
        )
        if self.reasoning and content:
            content = f"<think>\nThe user wants a paraphrase of {quoted_text(prompt)!r}. Let me reword it.\n</think>\n\n{content}"
        finish_reason = fault if fault in ("length", "content_filter") else "stop"
        completion_tokens = len((content or "").split()) or (body.get("max_completion_tokens") or 0)
        return (
            200,
            json.dumps(
                {
                    "id": "chatcmpl-local",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body.get("model", "local"),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": finish_reason,
                            "message": {"role": "assistant", "content": content, "refusal": None},
                        }
                    ],
                    "usage": {
                        "prompt_tokens": len(prompt.split()),
                        "completion_tokens": completion_tokens,
                        "total_tokens": len(prompt.split()) + completion_tokens,
                    },
                }
            ).encode(),
            "application/json",
            [],
        )

    # --- the Batch API: /v1/files and /v1/batches, as OpenAI's (upload, create, retrieve, output file) ---

    def store_upload(self, content_type, raw):
        """A multipart/form-data upload (``file``, ``purpose``), as the client sends it."""
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        data = fields["file"].get_payload(decode=True)
        return self._add_file(data, fields["file"].get_filename(), fields["purpose"].get_content().strip())

    def _add_file(self, data, filename, purpose):
        with self.lock:
            file_id = f"file-{next(self._file_ids):04d}"
            record = {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
            }
            self.files[file_id] = {**record, "data": data}
        return record

    def pause(self, kind, data=b""):
        """Hold this request while ``pause_on`` matches it (the test kills the client meanwhile)."""
        if self.pause_on and self.pause_on[0] == kind and (self.pause_on[1] is None or self.pause_on[1](data)):
            self.pause_on = None
            self.paused.set()
            self.resume.wait(60)

    def create_batch(self, body):
        with self.lock:
            batch_id = f"batch_{next(self._batch_ids):04d}"
            lines = self.files[body["input_file_id"]]["data"].decode().splitlines()
            batch = {
                "id": batch_id,
                "object": "batch",
                "endpoint": body["endpoint"],
                "errors": None,
                "input_file_id": body["input_file_id"],
                "completion_window": body["completion_window"],
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": int(time.time()),
                "metadata": body.get("metadata"),
                "model": None,
                "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            }
            self.batches[batch_id] = batch
            expire, self.expire_next = self.expire_next, 0
        threading.Thread(target=self._run_batch, args=(batch_id, lines, expire), daemon=True).start()
        return dict(batch)

    @staticmethod
    def _tokens(lines):
        return sum(
            len("\n".join(m.get("content", "") for m in json.loads(line)["body"]["messages"]).split()) for line in lines
        )

    def _over_token_limit(self, batch_id, lines):
        """The batch fails validation when the queue's enqueued tokens would pass the limit (as OpenAI's does)."""
        if self.enqueued_token_limit is None:
            return False
        queued = sum(b.get("_tokens", 0) for i, b in self.batches.items() if i != batch_id and b["status"] in IN_FLIGHT)
        if queued + self._tokens(lines) <= self.enqueued_token_limit:
            return False
        error = {
            **OPENAI_TOKEN_LIMIT_ERROR,
            "message": OPENAI_TOKEN_LIMIT_ERROR["message"].format(limit=self.enqueued_token_limit),
        }
        self.batches[batch_id].update(
            status="failed",
            failed_at=int(time.time()),
            errors={"object": "list", "data": [error]},
            request_counts={"total": 0, "completed": 0, "failed": 0},
        )
        return True

    def _run_batch(self, batch_id, lines, expire):
        """Answer every line as /chat/completions would; the last ``expire`` lines expire unanswered; a cancelled
        batch keeps the lines answered before it was cancelled (the first half here)."""
        with self.lock:
            self.batches[batch_id]["_tokens"] = self._tokens(lines)
            if self._over_token_limit(batch_id, lines):
                return
            self.batches[batch_id]["status"] = "in_progress"
        created = time.monotonic()
        # re-read: a test may shorten a running batch, or release a held one
        while (
            time.monotonic() < created + self.batch_seconds or batch_id in self.held
        ) and batch_id not in self.cancelled:
            time.sleep(0.01)
        cancelled = batch_id in self.cancelled
        if cancelled:
            lines = lines[: len(lines) // 2]
        out, err = [], []
        for number, line in enumerate(lines):
            request = json.loads(line)
            record = {"id": f"batch_req_{batch_id}_{number}", "custom_id": request["custom_id"]}
            if number >= len(lines) - expire:
                err.append(
                    {
                        **record,
                        "response": None,
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the completion window expired.",
                        },
                    }
                )
                continue
            status, data, _, _ = self.answer(request["body"])
            try:
                payload = json.loads(data)
            except ValueError:
                payload = data.decode("utf-8", "replace")
            response = {"status_code": status, "request_id": f"req_{number}", "body": payload}
            (out if status == 200 else err).append({**record, "response": response, "error": None})
        files = {}
        for name, records in (("output", out), ("error", err)):
            if records:
                # the Batch API's output "may not match the input line order" (match by custom_id): as here,
                # where the lines come back reversed
                data = "".join(json.dumps(r) + "\n" for r in reversed(records)).encode()
                files[name] = self._add_file(data, f"{batch_id}_{name}.jsonl", "batch_output")["id"]
        with self.lock:
            if batch_id not in self.batches:  # forgotten meanwhile
                return
            self.batches[batch_id].update(
                status="cancelled" if cancelled else "expired" if expire else "completed",
                output_file_id=files.get("output"),
                error_file_id=files.get("error"),
                request_counts={"total": len(lines), "completed": len(out), "failed": len(err)},
            )

    def cancel(self, batch_id):
        """What ``POST /batches/{id}/cancel`` does: cancelling now, cancelled once its thread stops."""
        with self.lock:
            batch = self.batches[batch_id]
            if batch["status"] in IN_FLIGHT:
                batch.update(status="cancelling", cancelling_at=int(time.time()))
                self.cancelled.add(batch_id)
            return public(batch)

    def forget(self, object_id):
        """A batch or file this server no longer knows (another key or project, a deleted file): 404 from now on."""
        with self.lock:
            (self.batches if object_id.startswith("batch_") else self.files).pop(object_id)

    def list_batches(self, query):
        """``GET /batches``: newest first, ``limit`` (1..100, default 20) after the batch ``after``."""
        with self.lock:
            batches = [public(b) for b in sorted(self.batches.values(), key=lambda b: b["id"], reverse=True)]
        after = query.get("after", [None])[0]
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1 :] if after in ids else []
        limit = max(1, min(100, int(query.get("limit", ["20"])[0])))
        page = batches[:limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(batches) > limit,
        }

    def paid_lines(self):
        """Batch lines answered (200): what the Batch API bills."""
        with self.lock:
            return sum(1 for _, _, outcome in self.log if outcome == "ok")


def run_batch_file(server, in_path, out_path):
    """What ``vllm run-batch -i in_path -o out_path`` writes, answered by ``server``: one line per request, in input
    order, ``{"id": "vllm-...", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}``; a refused
    request has ``body`` null and vLLM's ``ErrorResponse`` as ``error``."""
    lines = []
    with open(in_path, encoding="utf-8") as f:
        for number, line in enumerate(f):
            request = json.loads(line)
            status, data, _, _ = server.answer(request["body"])
            payload = json.loads(data)
            ok = status == 200
            lines.append(
                {
                    "id": f"vllm-{number:032x}",
                    "custom_id": request["custom_id"],
                    "response": {
                        "status_code": status,
                        "request_id": f"vllm-batch-{number:032x}",
                        "body": payload if ok else None,
                    },
                    "error": None if ok else {"error": {**payload.get("error", payload), "code": status}},
                }
            )
    with open(out_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)


def public(batch):
    """A batch as the API shows it (without this server's own fields)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects

    def log_message(self, *args):  # quiet: tests and benchmarks read their own output
        pass

    def _send(self, status, body, headers=(), content_type="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _redirected(self):
        """Record the request's headers; answer 307 if the server redirects everything."""
        server = self.server
        with server.lock:
            server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        if server.redirect_to is None:
            return False
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._send(307, b"", [("Location", server.redirect_to.rstrip("/") + self.path.split("/v1", 1)[-1])])
        return True

    def do_GET(self):
        server, (path, _, query) = self.server, self.path.partition("?")
        path = path.rstrip("/")
        if self._redirected():
            return
        if path.endswith("/models"):
            return self._send(200, {"object": "list", "data": [{"id": "local-paraphraser", "object": "model"}]})
        if path.endswith("/batches"):
            return self._send(200, server.list_batches(urllib.parse.parse_qs(query)))
        parts = path.split("/")
        if parts[-2:-1] == ["batches"]:
            with server.lock:
                failing = server.retrieve_failures > 0
                server.retrieve_failures -= failing
                batch = server.batches.get(parts[-1])
            if failing:
                return self._send(
                    500,
                    SERVER_ERROR,
                )
            if batch is None:
                return self._send(404, not_found("batch", parts[-1]))
            return self._send(200, public(batch))
        if parts[-1] == "content":
            server.pause("content")
            with server.lock:
                file = server.files.get(parts[-2])
            if file is None:
                return self._send(404, not_found("file", parts[-2]))
            return self._send(200, file["data"], content_type="application/octet-stream")
        self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self):
        server = self.server
        if self._redirected():
            return
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with server.lock:
            server.authorizations.add(self.headers.get("Authorization", ""))
        path = self.path.rstrip("/")
        if path.endswith("/files"):
            server.pause("upload", raw)
            return self._send(200, server.store_upload(self.headers.get("Content-Type", ""), raw))
        body = json.loads(raw or b"{}")
        if path.endswith("/cancel"):
            batch_id = path.split("/")[-2]
            if batch_id not in server.batches:
                return self._send(404, not_found("batch", batch_id))
            return self._send(200, server.cancel(batch_id))
        if path.endswith("/batches"):
            batch = server.create_batch(body)
            server.pause("create")
            with server.lock:
                fault = server.create_faults.popleft() if server.create_faults else None
            if fault == "drop":  # the batch exists; its reply is lost (a reset connection)
                self.close_connection = True
                return
            if fault == "500":
                return self._send(
                    500,
                    SERVER_ERROR,
                )
            return self._send(200, public(batch))
        if not path.endswith("/chat/completions"):
            return self._send(404, {"error": {"message": f"no route {self.path}"}})
        status, data, content_type, headers = server.answer(body)
        self._send(status, data, headers, content_type)


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
