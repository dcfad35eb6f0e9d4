"""The ``vllm`` backend: vLLM's offline engine (``LLM.chat``), in chunks of ``chunk_size`` prompts.

``LLM.chat`` applies a chat template to each one-turn conversation and batches the lot on the GPU
(continuous batching does the scheduling). How it is used, as vLLM really behaves:

* **Chat template.** A model whose tokenizer has none (a LLaMA-1-style paraphraser) makes
  ``LLM.chat`` raise ``ValueError``; ``chat_template`` (``--chat-template FILE``) is passed through,
  and without it the error names the flag.
* **Per-request seeds.** Each prompt gets its own ``SamplingParams(seed=...)``, the seed derived from
  its cache key (attempt included), so an output is a function of (model, prompts, settings, step,
  input, attempt), not of which other prompts shared its batch.
* **Checked outputs.** As many outputs as prompts, or the job stops; ``finish_reason`` ``length``
  drops the sample by that reason, as on the API path.
* **Chunks.** Results reach the cache chunk by chunk, so a preempted job loses at most one chunk of
  GPU work.

``vllm`` is imported here, only when this backend is chosen (``pip install .[vllm]``). ``engine``
and ``sampling_params_cls`` let a caller hand in an engine built elsewhere (or a stand-in for tests).
"""
import hashlib

from ..cache import seed_of
from .base import Completion, GenerationError


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vllm backend needs vLLM: pip install '.[vllm]' (on a GPU machine)") from e
    return vllm


class VLLMBackend:
    def __init__(self, model, tensor_parallel_size=1, temperature=1.0, top_p=0.1, max_tokens=512,
                 seed=0, chat_template=None, chunk_size=2048, engine=None, sampling_params_cls=None,
                 **engine_kwargs):
        self.model = model
        if engine is None or sampling_params_cls is None:
            vllm = _import_vllm()
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            if engine is None:
                engine = vllm.LLM(model=model, tensor_parallel_size=tensor_parallel_size, seed=seed, **engine_kwargs)
        self.engine = engine
        self.sampling_params_cls = sampling_params_cls
        self.sampling = dict(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.seed = seed
        self.chat_template = chat_template  # the template's text (make_shards reads --chat-template FILE)
        self.chunk_size = chunk_size
        # Every setting that changes an output: the cache keys on it and each sample's json records it.
        self.output_settings = dict(backend="vllm", seed=seed, **self.sampling)
        if chat_template is not None:
            self.output_settings["chat_template_sha256"] = hashlib.sha256(chat_template.encode()).hexdigest()[:16]
        self.requests = 0

    def generate(self, prompts, on_result=None, keys=None):
        """``keys`` (one ``cache.request_key`` per prompt) give each request its own seed."""
        seeds = [seed_of(k) for k in keys] if keys is not None else [self.seed + i for i in range(len(prompts))]
        results = []
        for start in range(0, len(prompts), self.chunk_size):
            chunk = prompts[start:start + self.chunk_size]
            outputs = self._chat(chunk, seeds[start:start + self.chunk_size])
            self.requests += len(chunk)
            for offset, output in enumerate(outputs):
                best = output.outputs[0]
                completion = Completion.from_service(best.text, best.finish_reason,
                                                     len(output.prompt_token_ids or ()), len(best.token_ids or ()))
                results.append(completion)
                if on_result is not None:
                    on_result(start + offset, completion)
        return results

    def _chat(self, prompts, seeds):
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        params = [self.sampling_params_cls(seed=seed, **self.sampling) for seed in seeds]
        try:
            outputs = self.engine.chat(conversations, params, use_tqdm=False, chat_template=self.chat_template)
        except ValueError as e:
            if "chat template" in str(e).lower() or "chat_template" in str(e):
                hint = ("this model's tokenizer has no chat template: pass one with --chat-template FILE"
                        if self.chat_template is None else "the template given with --chat-template failed")
                raise GenerationError(f"vLLM {self.model}: {hint} ({e})") from None
            raise
        if len(outputs) != len(prompts):
            raise GenerationError(f"vLLM {self.model} returned {len(outputs)} outputs for {len(prompts)} prompts")
        return outputs

    def close(self):
        pass
