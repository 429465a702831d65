"""`nextserve serve --load-format dummy` on a folder holding only config.json, as a user runs it: random weights,
the synthetic tokenizer and its chat template answer a chat completion and a completion."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import openai

from nextserve.assets import default_model_path


def test_serve_dummy_weights_answers_chat_and_completion(tmp_path):
    shutil.copy(Path(default_model_path()) / "config.json", tmp_path / "config.json")
    argv = [sys.executable, "-m", "nextserve", "serve", "--model", str(tmp_path), "--load-format", "dummy"]
    argv += ["--port", "0", "--device", "cpu", "--cpu-cache-bytes", str(16 << 20), "--served-model-name", "dummy"]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    try:
        deadline = time.monotonic() + 60
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if ready := re.search(r"nextserve ready: (http://127\.0\.0\.1:\d+)", line):
                break
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        assert ready, "".join(lines)
        log = "".join(lines)
        assert "dummy (random) weights" in log and "synthetic" in log
        client = openai.OpenAI(base_url=ready[1] + "/v1", api_key="none", max_retries=0, timeout=30)

        msgs = [{"role": "user", "content": "time year people"}]
        chat = client.chat.completions.create(model="dummy", messages=msgs, max_tokens=5, temperature=0)
        assert chat.choices[0].message.content and 0 < chat.usage.completion_tokens <= 5
        # ChatML: <|im_start|> user, 3 words, <|im_end|>, <|im_start|> assistant.
        assert chat.usage.prompt_tokens == 8

        done = client.completions.create(model="dummy", prompt="time year people way", max_tokens=5, temperature=0)
        assert done.choices[0].text.strip() and done.usage.prompt_tokens == 4
        assert 0 < done.usage.completion_tokens <= 5
    finally:
        proc.terminate()
        proc.wait(timeout=30)
