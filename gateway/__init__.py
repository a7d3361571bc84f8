"""gateway: an OpenAI-compatible LLM server with continuous batching over a paged KV cache."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import gateway` (e.g. by the CLI's argument parser) stays light.
    if name == "LLM":
        from gateway.engine.llm import LLM
        return LLM
    if name == "SamplingParams":
        from gateway.sampling.params import SamplingParams
        return SamplingParams
    raise AttributeError(name)
