"""The ``vllm`` backend: vLLM's offline engine, one ``LLM.chat`` call per step of a whole shard.

``LLM.chat`` applies the model's chat template to each one-turn conversation and batches the
lot on the GPU (continuous batching does the scheduling). ``vllm`` is imported here, only when this
backend is chosen (``pip install .[vllm]``). ``engine`` and ``sampling_params_cls`` let a caller
hand in an engine built elsewhere (or a stand-in for tests) instead of building ``vllm.LLM``.
"""
from .base import Completion


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("the vllm backend needs vLLM: pip install '.[vllm]' (on a GPU machine)") from e
    return vllm


class VLLMBackend:
    def __init__(self, model, tensor_parallel_size=1, temperature=1.0, top_p=0.1, max_tokens=512,
                 seed=0, engine=None, sampling_params_cls=None, **engine_kwargs):
        self.model = model
        if engine is None or sampling_params_cls is None:
            vllm = _import_vllm()
            sampling_params_cls = sampling_params_cls or vllm.SamplingParams
            if engine is None:
                engine = vllm.LLM(model=model, tensor_parallel_size=tensor_parallel_size, seed=seed, **engine_kwargs)
        self.engine = engine
        self.sampling_params = sampling_params_cls(temperature=temperature, top_p=top_p, max_tokens=max_tokens)
        self.requests = 0

    def generate(self, prompts, on_result=None):
        if not prompts:
            return []
        conversations = [[{"role": "user", "content": p}] for p in prompts]
        outputs = self.engine.chat(conversations, self.sampling_params, use_tqdm=False)
        self.requests += len(prompts)
        results = []
        for index, output in enumerate(outputs):
            best = output.outputs[0]
            completion = Completion(best.text, len(output.prompt_token_ids or ()), len(best.token_ids or ()))
            results.append(completion)
            if on_result is not None:
                on_result(index, completion)
        return results

    def close(self):
        pass
