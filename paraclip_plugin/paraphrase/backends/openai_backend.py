"""The ``openai`` backend: the official async client with ``concurrency`` requests in flight.

What the client does itself is left to it: retries of 429 (honouring Retry-After up to its 120 s
cap, openai>=2.52), 5xx, connection errors and timeouts (``max_retries``, ``timeout``). What it
does not do is done here, each bounded:

* **Rate limits longer than the client waits.** A Retry-After above 120 s makes the client raise
  ``RateLimitError`` at once (quota windows, tier limits). Every request then waits it out together,
  with a log line, up to ``max_wait`` seconds per stretch of rate limiting; beyond that the job stops
  cleanly (``GenerationError``; the cache keeps what was paid for).
* **Odd 200 bodies.** A non-JSON content type (the client returns the body as a ``str``), ``choices``
  that is not a list, invalid UTF-8 or truncated JSON are retried ``malformed_retries`` times, then
  stop the job with one line naming the request.
* **finish_reason.** ``content_filter`` and ``length`` end the sample (dropped by that reason, no
  retry: the same input fails the same way), whether ``message.content`` is None or not; a
  ``message.refusal`` is the output (the cleaner rejects it as a refusal).
* **Refused requests (400/422).** Returned as ``request_rejected`` with the server's own message;
  the pipeline tells one refused caption from a server that refuses everything. One refusal is
  handled here: a server that rejects the token-limit parameter's name (OpenAI's reasoning models
  reject ``max_tokens``) gets the other name, once, for the rest of the job.

The token limit is sent as ``max_completion_tokens`` to api.openai.com (``max_tokens`` is deprecated
there) and as ``max_tokens`` to other servers (what every OpenAI-compatible server takes), unless
``token_param`` says otherwise. The API key is chosen by the caller (see ``api_key_for``) and handed
to the client only.
"""

import asyncio
import json
import logging
import math
import os
import random
import re
import time
import urllib.parse

import openai

from ..cleaning import REQUEST_REJECTED
from .base import Completion, GenerationError

log = logging.getLogger(__name__)

OPENAI_HOST = "api.openai.com"
TOKEN_PARAMS = ("max_tokens", "max_completion_tokens")


def is_openai_host(base_url):
    return urllib.parse.urlsplit(base_url).hostname == OPENAI_HOST


def redact_url(url):
    """``url`` as it may appear in a log line: scheme, host, port and path, without ``user:password@``,
    query or fragment (where credentials can hide)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:
        port = None
    return urllib.parse.urlunsplit((parts.scheme, host if port is None else f"{host}:{port}", parts.path, "", ""))


def resolve_base_url(base_url, environ):
    """``(url, where it came from)``: the flag, else OPENAI_BASE_URL (as the client would read it), else
    OpenAI's own (from ``None``). A URL holding credentials (``user:password@``) is refused: the client
    would send them as Basic auth in place of the key, and URLs are printed in error lines; so is one with a
    query (``?api-key=...``), which the client would break."""
    source = "--base-url" if base_url else "OPENAI_BASE_URL" if environ.get("OPENAI_BASE_URL") else None
    url = base_url or environ.get("OPENAI_BASE_URL") or f"https://{OPENAI_HOST}/v1"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{source} {redact_url(url)}: expected http(s)://HOST[:PORT]/PATH")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            f"{source}: a URL with credentials (user:password@{parts.hostname}) is refused; put the key "
            f"in an environment variable and name it with --api-key-env"
        )
    if parts.query or parts.fragment:  # the client appends its paths after them: requests would go astray
        raise ValueError(
            f"{source} {redact_url(url)}: a URL with a query or fragment (?... or #...) is refused "
            f"(the client appends /chat/completions after it); a key goes in --api-key-env"
        )
    return url, source


def checked_key(name, value):
    """A key as it can go into an HTTP header, or an error naming the variable, never the value: a stray
    CR/LF/space (a key file with Windows line ends) would otherwise make the HTTP library raise an error
    that prints the whole header, key included."""
    if any(not 0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError(
            f"the value of {name} holds white space, a line end or a non-ASCII character (a key file "
            f"with Windows line ends?); fix the variable (its value is not shown)"
        )
    return value


def api_key_for(base_url, key_env, environ, source="--base-url"):
    """The key for ``base_url`` (from ``source``, ``None`` when it is OpenAI's by default): OPENAI_API_KEY
    goes to OpenAI's host only, over https; any other host gets the variable named by ``--api-key-env``,
    or a placeholder (``vllm serve`` without ``--api-key``)."""
    parts = urllib.parse.urlsplit(base_url)
    if is_openai_host(base_url) and (parts.scheme != "https" or parts.port not in (None, 443)):
        raise ValueError(
            f"{source} {redact_url(base_url)}: keys go to {OPENAI_HOST} over https (port 443) only, "
            f"never in clear text or to another port"
        )
    if key_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env):
            raise ValueError(
                "--api-key-env takes the NAME of an environment variable (letters, digits, _), not a "
                "key; what was given is not repeated here"
            )
        if source is None:
            raise ValueError(
                f"--api-key-env {key_env} names the key for --base-url, but neither --base-url nor "
                f"OPENAI_BASE_URL is given, so it would go to {OPENAI_HOST}: name the server with "
                f"--base-url (https://{OPENAI_HOST}/v1 to send {key_env} there)"
            )
        if not environ.get(key_env):
            raise ValueError(f"--api-key-env {key_env}: the environment variable {key_env} is not set")
        return checked_key(key_env, environ[key_env])
    if is_openai_host(base_url):
        if not environ.get("OPENAI_API_KEY"):
            raise ValueError(
                f"set OPENAI_API_KEY in the environment for {redact_url(base_url)} (keys are never taken from flags)"
            )
        return checked_key("OPENAI_API_KEY", environ["OPENAI_API_KEY"])
    return "EMPTY"


def environment_header_names(environ):
    """The headers the client adds from the environment by itself: OPENAI_ORG_ID, OPENAI_PROJECT_ID and every
    line of OPENAI_CUSTOM_HEADERS (``Name: value``), parsed as the client parses it."""
    names = ["OpenAI-Organization", "OpenAI-Project"]
    for line in (environ.get("OPENAI_CUSTOM_HEADERS") or "").split("\n"):
        if ":" in line and line[: line.find(":")].strip().lower() != "authorization":
            names.append(line[: line.find(":")].strip())
    return names


def make_client(api_key, base_url, asynchronous=False, environ=os.environ, **kwargs):
    """The official client (``AsyncOpenAI`` if ``asynchronous``), credentials explicit:

    * our own Authorization header replaces one the client would take from OPENAI_CUSTOM_HEADERS;
    * for any host but OpenAI's, the headers the client would add from the environment (organization,
      project, OPENAI_CUSTOM_HEADERS such as an Azure ``api-key``) are left out: they are OpenAI's;
    * redirects are not followed (the HTTP library drops Authorization on a cross-host redirect, but not
      ``api-key`` and the like): a redirect stops the job, naming where it points.
    """
    headers = {"Authorization": f"Bearer {api_key}"}
    if not is_openai_host(base_url):
        headers.update({name: openai.Omit() for name in environment_header_names(environ)})
    client, http = (
        (openai.AsyncOpenAI, openai.DefaultAsyncHttpxClient)
        if asynchronous
        else (openai.OpenAI, openai.DefaultHttpxClient)
    )
    return client(
        api_key=api_key, base_url=base_url, default_headers=headers, http_client=http(follow_redirects=False), **kwargs
    )


def api_error_message(endpoint, error):
    """One line for an API error that the client gave up on; a redirect names its target (redacted)."""
    response = getattr(error, "response", None)
    status = getattr(error, "status_code", None)
    if isinstance(status, int) and 300 <= status < 400 and response is not None:
        target = redact_url(response.headers.get("location", "") or "?")
        return (
            f"{endpoint} answered HTTP {status}, a redirect to {target}, which is not followed (credentials "
            f"go to the URL given only): pass the final URL as --base-url"
        )
    if isinstance(status, int) and 400 <= status < 500 and status not in (408, 409, 429):  # the client never retries
        return f"{endpoint} answered HTTP {status}: {type(error).__name__}: {str(error)[:300]}"
    return f"{endpoint} failed after the client's retries: {type(error).__name__}: {str(error)[:300]}"


def resolve_token_param(token_param, base_url):
    """``auto``: ``max_completion_tokens`` for api.openai.com (``max_tokens`` is deprecated there), else ``max_tokens``."""
    if token_param == "auto":
        return "max_completion_tokens" if is_openai_host(base_url) else "max_tokens"
    if token_param not in TOKEN_PARAMS:
        raise ValueError(f"token_param {token_param!r}: choose auto, max_tokens or max_completion_tokens")
    return token_param


class MalformedResponse(ValueError):
    pass


def _tokens(usage, name):
    value = getattr(usage, name, 0) if usage is not None else 0
    return value if isinstance(value, int) else 0


def read_completion(response):
    """A ``Completion`` from the client's parsed response, or ``MalformedResponse`` saying what is odd."""
    if isinstance(response, str):  # the client's answer to a 200 with a non-JSON content type
        raise MalformedResponse(f"a body that is not JSON ({response[:60]!r})")
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices:
        raise MalformedResponse(f"'choices' is {type(choices).__name__} {str(choices)[:40]}, not a non-empty list")
    message = getattr(choices[0], "message", None)
    content = getattr(message, "content", None)
    if message is None or not isinstance(content, (str, type(None))):
        raise MalformedResponse("a choice without a message")
    usage = getattr(response, "usage", None)
    tokens = _tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")
    finish_reason = getattr(choices[0], "finish_reason", None)
    if content is None and isinstance(getattr(message, "refusal", None), str):
        content = message.refusal  # structured-output refusals: the cleaner names them ("I'm sorry, ...")
    return Completion.from_service(content, finish_reason, *tokens)


def service_message(error):
    """The server's own words from an API error (OpenAI's and vLLM's bodies both carry ``message``)."""
    body = error.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f"HTTP {error.status_code}: {body['message']}"
    return str(error)


class OpenAIBackend:
    def __init__(
        self,
        model,
        api_key,
        base_url=None,
        concurrency=64,
        timeout=60.0,
        max_retries=8,
        malformed_retries=5,
        temperature=1.0,
        top_p=0.1,
        max_tokens=512,
        token_param="auto",
        max_wait=900.0,
    ):
        base_url = base_url or f"https://{OPENAI_HOST}/v1"
        token_param = resolve_token_param(token_param, base_url)
        self.model = model
        self.concurrency = concurrency
        self.malformed_retries = malformed_retries
        self.max_wait = max_wait
        self.token_param = token_param
        self._param_switched = False
        self.sampling = dict(temperature=temperature, top_p=top_p)
        self.max_tokens = max_tokens
        # Every setting that changes an output: the cache keys on it and each sample's json records it.
        self.output_settings = dict(backend="openai", temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.endpoint = f"POST {redact_url(base_url).rstrip('/')}/chat/completions"
        self._client_kwargs = dict(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        # One loop for the backend's life, so the client's keep-alive connections are reused across
        # batches; the client is created inside it because its connection pool binds to a loop.
        self._loop = asyncio.new_event_loop()
        self._client = None
        self._paused_until = 0.0  # clock time until which every request waits out a rate limit
        self._waited = 0.0  # seconds waited in the current stretch of rate limiting
        self.rate_limit_waits = []  # seconds of each wait, for the stats
        self._clock, self._sleep = time.monotonic, asyncio.sleep  # the rate-limit waits' time (tests fast-forward it)
        self.requests = 0

    def generate(self, prompts, on_result=None, keys=None, step=None):
        return self._loop.run_until_complete(self._generate(prompts, on_result))

    async def _generate(self, prompts, on_result):
        if self._client is None:
            self._client = make_client(**self._client_kwargs, asynchronous=True)
        in_flight = asyncio.Semaphore(self.concurrency)
        results = [None] * len(prompts)
        failed = asyncio.Event()  # once one request fails for good, start no new ones

        async def one(index, prompt):
            async with in_flight:
                if failed.is_set():
                    return
                try:
                    results[index] = completion = await self._complete(prompt)
                    if on_result is not None:
                        on_result(index, completion)  # may stop the job (a systematic refusal)
                except BaseException:
                    failed.set()
                    raise

        tasks = [asyncio.ensure_future(one(i, p)) for i, p in enumerate(prompts)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return results

    async def _complete(self, prompt):
        malformed = 0
        while True:
            pause = self._paused_until - self._clock()
            if pause > 0:
                await self._sleep(pause)
            self.requests += 1
            try:
                response = await self._client.chat.completions.create(
                    model=self.model,
                    messages=[{"role": "user", "content": prompt}],
                    **self.sampling,
                    **{self.token_param: self.max_tokens},
                )
                completion = read_completion(response)
            except (
                json.JSONDecodeError,
                UnicodeDecodeError,
                MalformedResponse,
                openai.APIResponseValidationError,
            ) as e:
                malformed += 1
                if malformed > self.malformed_retries:
                    raise GenerationError(
                        f"malformed 200 responses {malformed} times in a row to {self.endpoint} "
                        f"(prompt {prompt[:60]!r}): {type(e).__name__}: {str(e)[:200]}"
                    ) from None
                await asyncio.sleep(min(0.05 * 2**malformed, 2.0) * (1 + random.random()))
                continue
            except openai.RateLimitError as e:
                await self._wait_out(e)
                continue
            except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
                if self._switch_token_param(e):
                    continue
                # The request itself is refused: retrying cannot help. The pipeline decides whether
                # this is one bad caption (dropped by reason) or a server refusing everything (stop).
                return Completion(None, error=REQUEST_REJECTED, message=service_message(e))
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                # The client already retried 5xx/timeouts/connection errors max_retries times.
                raise GenerationError(api_error_message(self.endpoint, e)) from None
            self._waited = 0.0
            return completion

    def _switch_token_param(self, error):
        """True (once) if the server refused the token-limit parameter's name: use the other from now on."""
        body = error.body if isinstance(error.body, dict) else {}
        message = str(body.get("message") or error).lower()
        names_it = body.get("param") == self.token_param or f"'{self.token_param}'" in message
        refused = any(w in message for w in ("unsupported", "not supported", "unrecognized", "not permitted"))
        if self._param_switched or not (names_it and refused):
            return False
        other = TOKEN_PARAMS[1 - TOKEN_PARAMS.index(self.token_param)]
        log.warning(
            "the server refused '%s' (%s); sending '%s' from now on", self.token_param, service_message(error), other
        )
        self.token_param, self._param_switched = other, True
        return True

    async def _wait_out(self, error):
        now = self._clock()
        if self._paused_until > now:
            return  # another request already waits this one out; the loop's pause covers this request
        # The client's own Retry-After parser (retry-after-ms, seconds, HTTP date).
        retry_after = self._client._parse_retry_after_header(error.response.headers)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > 0:
            delay, why = retry_after, "as Retry-After says"
        else:
            delay, why = min(60.0, 2.0 ** len(self.rate_limit_waits)), "(no Retry-After; backing off)"
        if self._waited + delay > self.max_wait:
            raise GenerationError(
                f"rate limited by {self.endpoint}: waiting {delay:.0f} s more {why} would exceed --max-wait "
                f"{self.max_wait:.0f} s ({self._waited:.0f} s waited); rerun later: every completion so far is cached"
            )
        self._waited += delay
        self._paused_until = now + delay
        self.rate_limit_waits.append(delay)
        log.warning(
            "rate limited (HTTP 429): all requests wait %.0f s %s (%.0f of --max-wait %.0f s)",
            delay,
            why,
            self._waited,
            self.max_wait,
        )

    def close(self):
        if self._client is not None:
            self._loop.run_until_complete(self._client.close())
        self._loop.close()
