"""nextserve: inference and serving for Qwen3-Next."""
