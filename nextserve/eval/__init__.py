"""Accuracy evaluations (GSM8K, MMLU) of any OpenAI-compatible server; no engine code is imported."""
