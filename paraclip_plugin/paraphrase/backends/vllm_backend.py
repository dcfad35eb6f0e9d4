"""The ``vllm`` backend: vLLM's offline engine (``LLM.chat``), in chunks of ``chunk_size`` prompts.

``LLM.chat`` applies a chat template to each one-turn conversation and batches the lot on the GPU
(continuous batching does the scheduling). How it is used, as vLLM (read: 0.33) really behaves:

* **Errors.** vLLM raises its own ``VLLMError`` family (``ChatTemplateResolutionError``,
  ``VLLMValidationError``; not ``ValueError`` since 0.33, older releases raised ``ValueError``). They
  are told apart by class name and message, without importing vLLM's exception module:

  - a tokenizer without a chat template (a LLaMA-1-style paraphraser): the error names
    ``--chat-template FILE``, which is passed through as ``chat_template``;
  - a prompt longer than the model's context (``VLLMValidationError``, "maximum context length"):
    vLLM fails the whole call for it, so the chunk is halved until that prompt stands alone; it is
    dropped by reason ``prompt_too_long``, not cached (a rerun with a larger ``--max-model-len`` answers
    it). When even the chunk's shortest prompt does not fit, the job stops naming ``--max-model-len``;
  - anything else (a template that fails to render, ...): the job stops with one line.
* **Startup and settings.** Sampling settings are checked by vLLM's ``SamplingParams`` before the model
  loads; a failed start (out of memory, no KV-cache room) is one line naming ``--max-model-len`` and
  ``--gpu-memory-utilization``.
* **Per-request seeds.** Each prompt gets its own ``SamplingParams(seed=...)``, the seed derived from
  its cache key (attempt included), so the random draws are a function of (model, prompts, settings,
  step, input, attempt), not of which other prompts shared the batch. The logits themselves may differ
  in the last bits between batch compositions unless vLLM runs with ``VLLM_BATCH_INVARIANT=1``; the
  cache keeps reruns consistent either way.
* **Checked outputs.** As many outputs as prompts, or the job stops; ``finish_reason`` ``length``
  drops the sample by that reason, as on the API path; ``abort`` and ``error`` (an internal failure,
  partial text) are never taken as answers: those prompts are asked again once, then the job stops
  (a rerun asks again).
* **Chunks.** Results reach the cache chunk by chunk, so a preempted job loses at most one chunk of
  GPU work.

``vllm`` is imported here, only when this backend is chosen (``pip install .[vllm]``). ``engine``
and ``sampling_params_cls`` let a caller hand in an engine built elsewhere (or a stand-in for tests).
"""

import hashlib
import re

from ..cache import seed_of
from .base import PROMPT_TOO_LONG, Completion, GenerationError

TRANSIENT_FINISH_REASONS = ("abort", "error")
_TOO_LONG = re.compile(r"maximum context length|longer than the maximum model length")


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vllm backend needs vLLM: pip install '.[vllm]' (on a GPU machine)") from e
    return vllm


def _is_vllm_error(error):
    """vLLM's own errors (``VLLMError`` and subclasses, 0.33) or the ``ValueError`` of older releases."""
    return isinstance(error, ValueError) or any(c.__name__ == "VLLMError" for c in type(error).__mro__)


def _is_missing_template(error):
    text = str(error)
    return (
        any(c.__name__ == "ChatTemplateResolutionError" for c in type(error).__mro__)
        or "chat template" in text.lower()
        or "chat_template" in text
    )


def _is_prompt_too_long(error):
    return getattr(error, "parameter", None) in ("input_tokens", "input_text") or bool(_TOO_LONG.search(str(error)))


class VLLMBackend:
    def __init__(
        self,
        model,
        tensor_parallel_size=1,
        temperature=1.0,
        top_p=0.1,
        max_tokens=512,
        seed=0,
        chat_template=None,
        chunk_size=2048,
        engine=None,
        sampling_params_cls=None,
        **engine_kwargs,
    ):
        self.model = model
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        if engine is None or sampling_params_cls is None:
            vllm = _import_vllm()
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
        try:  # vLLM checks the ranges (top_p in (0, 1], ...): before minutes of model loading
            sampling_params_cls(seed=seed, **self.sampling)
        except Exception as e:
            if not _is_vllm_error(e):
                raise
            raise ValueError(f"--temperature/--top-p/--max-tokens: vLLM refuses them: {e}") from None
        if engine is None:
            try:
                engine = vllm.LLM(model=model, tensor_parallel_size=tensor_parallel_size, seed=seed, **engine_kwargs)
            except Exception as e:  # out of memory, no room for the KV cache, a bad model path, ...
                raise ValueError(
                    f"vLLM could not start {model}: {type(e).__name__}: {str(e)[:500]} (vLLM's log above says more; "
                    f"--max-model-len and --gpu-memory-utilization change what it needs)"
                ) from e
        self.engine = engine
        self.sampling_params_cls = sampling_params_cls
        self.seed = seed
        self.chat_template = chat_template  # the template's text (make_shards reads --chat-template FILE)
        self.chunk_size = chunk_size
        # Every setting that changes an output: the cache keys on it and each sample's json records it.
        self.output_settings = dict(backend="vllm", seed=seed, **self.sampling)
        if chat_template is not None:
            self.output_settings["chat_template_sha256"] = hashlib.sha256(chat_template.encode()).hexdigest()[:16]
        self.requests = 0

    def generate(self, prompts, on_result=None, keys=None, step=None):
        """``keys`` (one ``cache.request_key`` per prompt) give each request its own seed; without them the
        seed is a function of the base seed and the prompt."""
        if keys is None:
            keys = [hashlib.sha256(f"{self.seed}\n{p}".encode()).hexdigest() for p in prompts]
        seeds = [seed_of(k) for k in keys]
        results = []
        for start in range(0, len(prompts), self.chunk_size):
            chunk = prompts[start : start + self.chunk_size]
            completions = self._answers(chunk, seeds[start : start + self.chunk_size], whole_chunk=True)
            transient = [i for i, c in enumerate(completions) if c.finish_reason in TRANSIENT_FINISH_REASONS]
            if transient:  # asked again once, with the same seeds
                again = self._answers([chunk[i] for i in transient], [seeds[start + i] for i in transient])
                for i, completion in zip(transient, again):
                    completions[i] = completion
            for offset, completion in enumerate(completions):
                if completion.finish_reason in TRANSIENT_FINISH_REASONS:
                    continue
                results.append(completion)
                if on_result is not None:
                    on_result(start + offset, completion)
            failed = [c.finish_reason for c in completions if c.finish_reason in TRANSIENT_FINISH_REASONS]
            if failed:
                raise GenerationError(
                    f"vLLM {self.model}: {len(failed)} requests ended with finish_reason {sorted(set(failed))} twice "
                    f"(an internal failure; the other answers are cached): rerun to ask them again"
                )
        return results

    def _answers(self, prompts, seeds, whole_chunk=False):
        """One ``Completion`` per prompt; a prompt longer than the model's context is isolated by halving the
        batch (vLLM fails a whole call for it) and answered with ``prompt_too_long``."""
        try:
            outputs = self._chat(prompts, seeds)
        except Exception as e:
            if not (_is_vllm_error(e) and _is_prompt_too_long(e)):
                raise
            if len(prompts) == 1:
                return [Completion.from_service(None, PROMPT_TOO_LONG)]
            if whole_chunk:  # is the model's context too short for any prompt? then halving would ask 2n-1 times
                shortest = min(range(len(prompts)), key=lambda i: len(prompts[i]))
                if self._answers([prompts[shortest]], [seeds[shortest]])[0].error == PROMPT_TOO_LONG:
                    raise GenerationError(
                        f"vLLM {self.model}: even the shortest prompt of the chunk does not fit the model's context "
                        f"({e}): raise --max-model-len, or shorten --prompts"
                    ) from None
            half = len(prompts) // 2
            return self._answers(prompts[:half], seeds[:half]) + self._answers(prompts[half:], seeds[half:])
        completions = []
        for output in outputs:
            best = output.outputs[0]
            completions.append(
                Completion.from_service(
                    best.text, best.finish_reason, len(output.prompt_token_ids or ()), len(best.token_ids or ())
                )
            )
        return completions

    def _chat(self, prompts, seeds):
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        params = [self.sampling_params_cls(seed=seed, **self.sampling) for seed in seeds]
        self.requests += len(prompts)  # every prompt handed to the engine, halvings and re-asks included
        try:
            outputs = self.engine.chat(conversations, params, use_tqdm=False, chat_template=self.chat_template)
        except Exception as e:
            if not _is_vllm_error(e) or _is_prompt_too_long(e):
                raise
            if _is_missing_template(e) and self.chat_template is None:
                hint = "this model's tokenizer has no chat template: pass one with --chat-template FILE"
            elif self.chat_template is not None:
                hint = "vLLM refused the requests; the template given with --chat-template may be the cause"
            else:
                hint = "vLLM refused the requests"
            raise GenerationError(f"vLLM {self.model}: {hint} ({type(e).__name__}: {e})") from None
        if len(outputs) != len(prompts):
            raise GenerationError(f"vLLM {self.model} returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def close(self):
        pass
