"""One place picks each op's implementation and logs it; on CUDA a fast path that failed to import is an error that
names the package (or, with --allow-reference-kernels, a warning), never a silent fall back."""

import logging

import pytest
import torch

from nextserve.ops import attention, backends, gdn, moe

CUDA = torch.device("cuda")


def test_cpu_runs_the_references_and_logs_once(caplog):
    with caplog.at_level(logging.INFO, logger="nextserve.ops.backends"):
        chosen = backends.select(torch.device("cpu"))
    assert set(chosen) == {"attention", "conv1d", "gdn", "moe", "norm", "fp8"}
    assert set(chosen.values()) == {"torch-reference"}
    assert caplog.text.count("backends on cpu") == 1


def _pretend_all_imported(monkeypatch):
    """As on a GPU machine with every fast path importable (the modules need not work here)."""
    from nextserve.ops import conv1d, fp8, norm

    sentinel = object()
    for mod, attr in [(attention, "attention_triton"), (conv1d, "conv1d_triton"), (moe, "moe_triton"),
                      (norm, "norm_triton"), (fp8, "fp8_triton")]:  # fmt: skip
        monkeypatch.setattr(mod, attr, getattr(mod, attr) or sentinel)
        monkeypatch.setattr(mod, "IMPORT_ERROR", None)
    monkeypatch.setattr(fp8, "fp8_triton", type("M", (), {"SCALED_MM_MIN_M": 128}))
    fake_gdn = type("G", (), {"FLA_IMPORT_ERROR": None})
    monkeypatch.setattr(gdn, "gdn_cuda", fake_gdn)
    monkeypatch.setattr(gdn, "IMPORT_ERROR", None)
    return fake_gdn


def test_cuda_with_every_fast_path(monkeypatch, caplog):
    _pretend_all_imported(monkeypatch)
    with caplog.at_level(logging.INFO, logger="nextserve.ops.backends"):
        chosen = backends.select(CUDA)
    assert chosen["attention"] == "triton-paged" and chosen["gdn"] == "fla-chunk+triton-decode"
    assert chosen["fp8"] == "triton+scaled_mm(M>=128)"
    assert "attention=triton-paged" in caplog.text


def test_cuda_missing_triton_module_is_an_error_naming_it(monkeypatch, caplog):
    _pretend_all_imported(monkeypatch)
    monkeypatch.setattr(attention, "attention_triton", None)
    monkeypatch.setattr(attention, "IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(RuntimeError, match=r"attention: install triton .*No module named 'triton'"):
        backends.select(CUDA)
    with caplog.at_level(logging.WARNING, logger="nextserve.ops.backends"):
        chosen = backends.select(CUDA, allow_reference=True)
    assert chosen["attention"] == "torch-reference" and "torch reference" in caplog.text


def test_cuda_missing_fla_is_an_error_naming_fla_core(monkeypatch):
    fake_gdn = _pretend_all_imported(monkeypatch)
    fake_gdn.FLA_IMPORT_ERROR = ModuleNotFoundError("No module named 'fla'")
    with pytest.raises(RuntimeError, match=r"gdn: install fla-core"):
        backends.select(CUDA)


def test_engine_logs_its_backends(caplog):
    from nextserve import LLM

    with caplog.at_level(logging.INFO, logger="nextserve.ops.backends"):
        with LLM(disable_tqdm=True, cpu_cache_bytes=16 << 20) as llm:
            assert llm.engine.backends["moe"] == "torch-reference"
    assert "backends on cpu" in caplog.text
