"""nextserve: a small, correct and fast inference and serving engine for Qwen3-Next.

Public surface: `LLM` and `SamplingParams` (with `StructuredOutput` for guided decoding) for offline use;
`nextserve` / `python -m nextserve` for the CLI.
"""

from nextserve.outputs import CompletionOutput, RequestOutput
from nextserve.sampling_params import SamplingParams, StructuredOutput


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it lazily so `import nextserve` stays cheap for the CLI tools.
    if name == "LLM":
        from nextserve.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
