"""The README's first command, as a user runs it: `nextserve serve` on the built-in model in its own process, then
the README's chat request. Also: a bad flag gets a one-line error, not a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_builtin_model_and_answer_the_readme_request():
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextserve", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "nextserve ready: http://127.0.0.1:" in line:
                break
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        body = {
            "model": "tiny-qwen3-next",
            "messages": [{"role": "user", "content": "Speak, ROMEO."}],
            "max_tokens": 32,
        }
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"]
        assert 0 < reply["usage"]["completion_tokens"] <= 32
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_bad_flag_is_one_line_not_a_traceback():
    r = subprocess.run(
        [sys.executable, "-m", "nextserve", "generate", "--prompt", "x", "--page-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "--page-size must be >= 1" in r.stderr
