"""Corral: run, serve, tune and evaluate Llama-family chat models on your own hardware.

    from corral import LLM, SamplingParams
    llm = LLM(model="default")
    print(llm.chat([{"role": "user", "content": "Hi!"}], SamplingParams(max_tokens=32))[0].text)
"""

from corral.engine.config import EngineConfig
from corral.engine.llm import LLM, AsyncLLM
from corral.engine.structured import StructuredOutput
from corral.model.lora import LoRARequest
from corral.outputs import CompletionOutput, RequestOutput
from corral.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "AsyncLLM",
    "CompletionOutput",
    "EngineConfig",
    "LoRARequest",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutput",
    "load",
]
__version__ = "0.1.0"


def load(model: str = "default", **kwargs) -> LLM:
    """Load a model for offline generation (same as `LLM(model, ...)`)."""
    return LLM(model, **kwargs)
