"""SGLang's and vLLM's Qwen3-Next launch commands, verbatim, with `nextserve serve` (the table in docs/cli.md).

The hub ids they name are served from a Hugging Face cache made here, holding the built-in tiny model, with
HF_HUB_OFFLINE=1. Each command as written asks for 4 tensor-parallel ranks, which the built-in model (2 linear-attention
key heads) cannot be split into: it must fail at once with a clear message; the same command on one GPU
(tensor-parallel size 1) must start a server that answers a chat request with tools.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from nextserve import cli
from nextserve.assets import default_model_path
from nextserve.config import EngineConfig

ROOT = Path(__file__).resolve().parent.parent
INSTRUCT = "Qwen/Qwen3-Next-80B-A3B-Instruct"
THINKING = "Qwen/Qwen3-Next-80B-A3B-Thinking"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
V1_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def seed_rows() -> list[tuple[str, str]]:
    """(seed command, nextserve command) from the table in docs/cli.md."""
    doc = (ROOT / "docs" / "cli.md").read_text()
    table = doc.split("<!-- seed-commands:begin -->")[1].split("<!-- seed-commands:end -->")[0]
    return re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", table, flags=re.M)


ROWS = seed_rows()
IDS = [f"{i}-{'sglang' if 'sglang' in seed else 'vllm'}" for i, (seed, _) in enumerate(ROWS)]


def nextserve_argv(command: str) -> list[str]:
    argv = shlex.split(command)
    assert argv[:2] == ["nextserve", "serve"]
    return argv[2:]


def with_port_0(argv: list[str]) -> list[str]:
    i = argv.index("--port")
    return [*argv[:i], "--port", "0", *argv[i + 2 :]]


def one_gpu(argv: list[str]) -> list[str]:
    out = list(argv)
    for flag in ("--tp-size", "--tensor-parallel-size"):
        if flag in out:
            out[out.index(flag) + 1] = "1"
    return out


def _add_snapshot(cache: Path, repo: str, commit: str, ref: str) -> Path:
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in Path(default_model_path()).iterdir():
        (snapshot / f.name).symlink_to(f)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hf_home(tmp_path_factory) -> Path:
    """HF_HOME whose hub cache holds the tiny model as the Instruct (main and v1) and Thinking 80B."""
    home = tmp_path_factory.mktemp("hf-home")
    cache = home / "hub"
    _add_snapshot(cache, INSTRUCT, COMMIT, "main")
    _add_snapshot(cache, INSTRUCT, V1_COMMIT, "v1")
    _add_snapshot(cache, THINKING, COMMIT, "main")
    return home


@pytest.fixture
def offline_hub(hf_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def config_of(argv: list[str]) -> EngineConfig:
    args = cli.build_parser(["serve"]).parse_args(["serve", *argv])
    from nextserve.server import serve

    serve.resolve_model_arg(args)
    return EngineConfig.from_cli_args(args)


# ---- the table ----------------------------------------------------------------------------------------------
def test_table_covers_the_seed_commands_verbatim() -> None:
    assert len(ROWS) >= 10
    for seed, ours in ROWS:
        launcher = "python -m sglang.launch_server" if seed.startswith("python") else "vllm serve"
        assert seed.startswith(launcher + " ")
        assert ours == "nextserve serve " + seed.removeprefix(launcher + " "), "flags must be the seed's, unchanged"
    flags = " ".join(seed for seed, _ in ROWS)
    for flag in [
        "--model-path", "--tp-size", "--tensor-parallel-size", "--context-length", "--max-model-len",
        "--mem-fraction-static", "--speculative-algo", "--speculative-num-steps", "--speculative-eagle-topk",
        "--speculative-num-draft-tokens", "--speculative-config", "--compilation-config", "--rope-scaling",
        "--json-model-override-args", "--hf-overrides", "--mamba-scheduler-strategy", "--reasoning-parser",
    ]:  # fmt: skip
        assert flag in flags, flag
    assert any(seed.startswith(f"vllm serve {INSTRUCT}") for seed, _ in ROWS), "a positional model"


@pytest.mark.parametrize("seed, ours", ROWS, ids=IDS)
def test_as_written_asks_for_4_ranks_and_says_why_not(seed, ours, offline_hub, capsys) -> None:
    start = time.monotonic()
    assert cli.main(["serve", *with_port_0(nextserve_argv(ours))]) == 2
    err = capsys.readouterr().err
    assert "linear_num_key_heads=2 is not divisible by 4" in err and "Traceback" not in err
    assert time.monotonic() - start < 30, "refused before loading anything"


@pytest.mark.parametrize("seed, ours", ROWS, ids=IDS)
def test_one_gpu_variant_translates(seed, ours, offline_hub) -> None:
    argv = one_gpu(nextserve_argv(ours))
    cfg = config_of(argv)
    repo = INSTRUCT if INSTRUCT in ours else THINKING
    assert cfg.model == str(offline_hub / "hub" / ("models--" + repo.replace("/", "--")) / "snapshots" / COMMIT)
    assert cfg.tp_size == 1
    assert cfg.context_length == (1010000 if "1010000" in ours else 262144)
    if "--mem-fraction-static" in ours:
        assert cfg.mem_fraction_static == 0.8
    if "NEXTN" in ours:
        assert (cfg.speculative_algorithm, cfg.speculative_num_steps, cfg.speculative_num_draft_tokens) == (
            "NEXTN", 3, 4
        )  # fmt: skip
    if "qwen3_next_mtp" in ours:
        assert (cfg.speculative_algorithm, cfg.speculative_num_steps) == ("NEXTN", 2)
    if "yarn" in ours:
        assert cfg.model_overrides()["rope_scaling"]["factor"] == 4.0
    if "FULL_DECODE_ONLY" in ours:
        assert cfg.disable_cuda_graph is False
    if "extra_buffer" in ours:
        assert cfg.prefix_snapshot_interval is None  # the default grid


def _serve(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "nextserve", "serve", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: list[str] = []
    deadline = time.monotonic() + 180
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"nextserve ready: (http://127\.0\.0\.1:(\d+))", line):
            assert m[2] != "0", "--port 0 must report the port it bound"
            # Keep reading its log, or a full pipe would block the server mid-request.
            threading.Thread(target=lines.extend, args=(proc.stdout,), daemon=True).start()
            return proc, m[1], lines
        assert time.monotonic() < deadline, "".join(lines)
    proc.wait()
    raise AssertionError("the server exited:\n" + "".join(lines))


@pytest.mark.parametrize("seed, ours", ROWS, ids=IDS)
def test_one_gpu_variant_serves(seed, ours, hf_home) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    proc, url, lines = _serve(with_port_0(one_gpu(nextserve_argv(ours))), env)
    try:
        name = INSTRUCT if INSTRUCT in ours else THINKING
        models = httpx.get(url + "/v1/models", timeout=30).json()
        assert models["data"][0]["id"] == name, "a hub id is served under its own name"
        tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
        body = {"model": name, "messages": [{"role": "user", "content": "Weather?"}], "tools": [tool], "max_tokens": 8}
        try:
            r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
        except httpx.TimeoutException:
            pytest.fail("no answer in 120 s; server log:\n" + "".join(lines))
        assert r.status_code == 200, r.text + "".join(lines)
        assert "reasoning_content" in r.json()["choices"][0]["message"], "the reasoning parser is on by default"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ---- flags that cannot be honoured are clear errors ---------------------------------------------------------
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--speculative-algo", "NEXTN", "--speculative-eagle-topk", "2"], "only 1 (chain drafting)"),
        (["--speculative-config", '{"method":"eagle3","num_speculative_tokens":2}'], "only the model's MTP head"),
        (["--speculative-config", '{"method":"mtp","model":"x/y"}'], "['model'] not supported"),
        (["--speculative-config", "{method: mtp}"], "not valid JSON"),
        (["--speculative-config", '{"method":"mtp"}', "--speculative-num-steps", "5"], "--speculative-num-steps"),
        (["--compilation-config", '{"cudagraph_mode":"PIECEWISE"}'], "use FULL_DECODE_ONLY, or NONE"),
        (["--compilation-config", '{"cudagraph_mode":"FULL_AND_PIECEWISE"}'], "prefill eagerly"),
        (["--compilation-config", '{"level":3}'], "does not use torch.compile"),
        (["--compilation-config", '{"cudagraph_mode":"NONE"}', "--cuda-graph-max-bs", "8"], None),
        (["--rope-scaling", "[1]"], "must be a JSON object"),
        (["--mamba-scheduler-strategy", "no_buffer", "--prefix-snapshot-interval", "512"], "prefix-snapshot-interval"),
        (["--nnodes", "2", "--tp", "2"], "needs --dist-init-addr"),
        (["--nnodes", "2", "--tp", "3", "--dist-init-addr", "127.0.0.1:5000"], "must divide --tp-size 3"),
        (["--tp", "3"], "not divisible by 3"),
        (["-tp", "8"], "not divisible by 8"),
        ([INSTRUCT, "--model", "/elsewhere"], "two models given"),
    ],
)
def test_flags_we_cannot_honour(argv, message, offline_hub, capsys) -> None:
    if message is None:  # a valid combination, for contrast
        cfg = config_of(argv)
        assert cfg.disable_cuda_graph and cfg.cuda_graph_max_bs == 8
        return
    assert cli.main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_translations(offline_hub) -> None:
    cfg = config_of(["--mamba-scheduler-strategy", "no_buffer", "--page-size", "64"])
    assert cfg.prefix_snapshot_interval % 64 == 0 and cfg.prefix_snapshot_interval >= 2**30  # no grid
    cfg = config_of(["--compilation-config", '{"cudagraph_capture_sizes":[1,2,4,48]}', "--enforce-eager"])
    assert cfg.cuda_graph_max_bs == 48 and cfg.disable_cuda_graph
    cfg = config_of(["--gpu-memory-utilization", "0.7", "--max-num-seqs", "12", "--trust-remote-code"])
    assert (cfg.mem_fraction_static, cfg.max_running_requests) == (0.7, 12)
    yarn = {"rope_type": "yarn", "factor": 2.0}
    cfg = config_of(["--rope-scaling", json.dumps(yarn), "--json-model-override-args", '{"rope_theta": 5e6}'])
    assert cfg.model_overrides() == {"rope_theta": 5e6, "rope_scaling": yarn}
    # The same names as LLM(...) keyword arguments.
    kw = EngineConfig.from_kwargs(
        model=INSTRUCT, max_model_len=1024, tensor_parallel_size=1, speculative_config={"method": "qwen3_next_mtp"}
    )
    assert kw.context_length == 1024 and kw.speculative_algorithm == "NEXTN" and Path(kw.model).is_dir()
    with pytest.raises(TypeError, match="both given"):
        EngineConfig.from_kwargs(context_length=8, max_model_len=16)


# ---- hub ids ------------------------------------------------------------------------------------------------
def test_hub_revision(offline_hub) -> None:
    assert config_of([INSTRUCT, "--revision", "v1"]).model.endswith(V1_COMMIT)
    assert config_of(["--model-path", INSTRUCT, "--revision", COMMIT]).model.endswith(COMMIT)


@pytest.mark.parametrize(
    "argv",
    [["Qwen/Qwen3-Next-80B-A3B-Instruct-FP8"], [INSTRUCT, "--revision", "v2"]],
    ids=["not cached", "revision not cached"],
)
def test_offline_and_not_cached_says_so(argv, offline_hub, capsys) -> None:
    assert cli.main(["serve", "--port", "0", *argv]) == 2
    err = capsys.readouterr().err
    assert "not in the Hugging Face cache" in err and "HF_HUB_OFFLINE" in err and argv[0] in err
    assert str(offline_hub / "hub") in err and "Traceback" not in err


# ---- first-run friction -------------------------------------------------------------------------------------
def test_busy_port_is_reported_before_the_model_loads(capsys, caplog) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is already in use" in err and "Traceback" not in err
    assert not any("nextserve weights" in r.getMessage() for r in caplog.records), "the model was loaded first"
