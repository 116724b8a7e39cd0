"""Export trained phi-3 checkpoints to other runtimes: GGUF for llama.cpp (:mod:`phi3data.export.gguf`)."""
