"""The ``openai`` backend: the official async client with ``concurrency`` requests in flight.

Retries of 429 (honouring Retry-After), 5xx, connection errors and timeouts are the client's own
(``max_retries``, ``timeout``). One failure it does not retry: with openai 3.x a 200 response whose
body is not valid JSON raises ``json.JSONDecodeError`` from response parsing, outside its retry
loop; that and a body without a message are retried here, a bounded number of times.
``--base-url`` points the same backend at any OpenAI-compatible server (``vllm serve`` included).
The API key is read from the environment by the caller and handed to the client only.
"""
import asyncio
import json
import random

import openai

from ..cleaning import REQUEST_REJECTED
from .base import Completion, GenerationError


class MalformedResponse(ValueError):
    pass


class OpenAIBackend:
    def __init__(self, model, api_key, base_url=None, concurrency=64, timeout=60.0, max_retries=8,
                 malformed_retries=5, temperature=1.0, top_p=0.1, max_tokens=512):
        self.model = model
        self.concurrency = concurrency
        self.malformed_retries = malformed_retries
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self._client_kwargs = dict(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
        # One loop for the backend's life, so the client's keep-alive connections are reused across
        # batches; the client is created inside it because its connection pool binds to a loop.
        self._loop = asyncio.new_event_loop()
        self._client = None
        self.requests = 0

    def generate(self, prompts, on_result=None):
        return self._loop.run_until_complete(self._generate(prompts, on_result))

    async def _generate(self, prompts, on_result):
        if self._client is None:
            self._client = openai.AsyncOpenAI(**self._client_kwargs)
        in_flight = asyncio.Semaphore(self.concurrency)
        results = [None] * len(prompts)
        failed = asyncio.Event()  # once one request fails for good, start no new ones

        async def one(index, prompt):
            async with in_flight:
                if failed.is_set():
                    return
                try:
                    completion = await self._complete(prompt)
                except BaseException:
                    failed.set()
                    raise
            results[index] = completion
            if on_result is not None:
                on_result(index, completion)

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
        for attempt in range(self.malformed_retries + 1):
            self.requests += 1
            try:
                response = await self._client.chat.completions.create(
                    model=self.model, messages=[{"role": "user", "content": prompt}], **self.sampling)
                message = response.choices[0].message if response.choices else None
                if message is None or message.content is None:
                    raise MalformedResponse("response without a message")
                usage = response.usage
                return Completion(message.content, getattr(usage, "prompt_tokens", 0) or 0,
                                  getattr(usage, "completion_tokens", 0) or 0)
            except (json.JSONDecodeError, MalformedResponse, openai.APIResponseValidationError) as e:
                last = e
                await asyncio.sleep(min(0.05 * 2 ** attempt, 2.0) * (1 + random.random()))
            except (openai.BadRequestError, openai.UnprocessableEntityError):
                # The request itself is refused (e.g. a content filter): retrying cannot help, and
                # one bad caption must not stop a 5M-caption job. The sample is dropped by reason.
                return Completion(None, error=REQUEST_REJECTED)
            except (openai.APIConnectionError, openai.APIStatusError) as e:
                # The client already retried 429/5xx/timeouts max_retries times.
                raise GenerationError(f"request failed after the client's retries: {type(e).__name__}: {e}") from None
        raise GenerationError(f"malformed responses {self.malformed_retries + 1} times in a row: {last}")

    def close(self):
        if self._client is not None:
            self._loop.run_until_complete(self._client.close())
        self._loop.close()
