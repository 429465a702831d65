"""Tensor parallelism as users run it (gloo processes on the CPU): `nextserve serve --tp-size 2` answers the README's
request with TP1's tokens and leaves no process behind on SIGTERM; a rank that dies ends the server with an error
naming it; two "nodes" on one machine (`--nnodes 2`) generate what one process does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from nextserve import LLM, SamplingParams

pytestmark = pytest.mark.timeout(300)
PROMPT = list(range(100, 140))


def children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def rank_workers(pid: int) -> list[int]:
    """The server's rank processes (multiprocessing's resource tracker is a child too)."""
    return [c for c in children(pid) if b"resource_tracker" not in Path(f"/proc/{c}/cmdline").read_bytes()]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def start(*flags: str) -> tuple[subprocess.Popen, int, list[str]]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextserve", "serve", "--port", "0", "--device", "cpu", *flags],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines, deadline = [], time.monotonic() + 180
    for line in proc.stdout:
        lines.append(line)
        if "nextserve ready: http://127.0.0.1:" in line:
            return proc, int(line.rsplit(":", 1)[1].split()[0]), lines
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
    raise AssertionError("".join(lines))


def completion_tokens(port: int, n: int) -> list[int]:
    body = {"model": "tiny-qwen3-next", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
    body["return_token_ids"] = True
    r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice.get("token_ids") or choice["text"]


def test_tp2_server_answers_like_tp1_and_sigterm_leaves_no_process():
    proc, port, _ = start("--tp-size", "2")
    try:
        workers = children(proc.pid)
        assert workers, "the rank-1 worker should be a child of the server"
        messages = [{"role": "user", "content": "Speak, ROMEO."}]
        chat = {"model": "tiny-qwen3-next", "messages": messages, "max_tokens": 16}
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"], r.text
        got = completion_tokens(port, 12)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    with LLM(device="cpu", dtype="float32", disable_tqdm=True) as llm:
        want = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    assert got in (want[0].outputs[0].token_ids, want[0].outputs[0].text)
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "a worker outlived the server"


def test_a_dead_rank_ends_the_server_with_an_error_naming_it():
    proc, port, lines = start("--tp-size", "2")
    try:
        workers = rank_workers(proc.pid)
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        rest = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "tensor-parallel rank 1 exited" in rest, "".join(lines) + rest
    assert not any(alive(w) for w in workers + children(proc.pid))


def test_two_nodes_on_one_machine_generate_what_one_process_does(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        addr = f"127.0.0.1:{s.getsockname()[1]}"
    flags = ["--tp-size", "2", "--nnodes", "2", "--dist-init-addr", addr, "--device", "cpu", "--dtype", "float32"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    node1 = subprocess.Popen(
        [sys.executable, "-m", "nextserve", "serve", *flags, "--node-rank", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        kw = dict(tp_size=2, nnodes=2, node_rank=0, dist_init_addr=addr)
        with LLM(device="cpu", dtype="float32", disable_tqdm=True, **kw) as llm:
            got = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
        out = node1.communicate(timeout=60)[0]
        assert node1.returncode == 0, out
    finally:
        if node1.poll() is None:
            node1.kill()
            node1.wait()
    with LLM(device="cpu", dtype="float32", disable_tqdm=True) as llm:
        want = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    assert got == want


def test_a_killed_server_leaves_no_rank_behind():
    proc, _, _ = start("--tp-size", "2")
    workers = rank_workers(proc.pid)
    assert workers
    proc.kill()  # SIGKILL: no handler runs; each rank notices its parent is gone
    proc.wait(timeout=30)
    deadline = time.monotonic() + 15
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(w) for w in workers), "a rank outlived its killed server"
