"""Benchmarks. `serve`: the load generator for any OpenAI-compatible server (`nextserve bench serve`)."""
