"""iter_checkpoint on single-file, sharded and FP8 checkpoints, from our writer and from safetensors."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from nextserve.loader import (
    CheckpointError,
    dequantize_block_fp8,
    iter_checkpoint,
    quantize_block_fp8,
    read_config,
    write_checkpoint,
)

FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(50, 16, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(200, 300, generator=gen).to(torch.bfloat16),
        "model.layers.0.input_layernorm.weight": torch.randn(16, generator=gen),
        "model.layers.0.linear_attn.A_log": torch.randn(4, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.experts.0.down_proj.weight": torch.randn(129, 64, generator=gen).to(torch.bfloat16),
        "model.position_ids": torch.arange(7),
    }


def _load(path, **kw) -> dict[str, torch.Tensor]:
    out = dict(iter_checkpoint(path, progress=False, **kw))
    assert all(t.is_contiguous() for t in out.values())
    return out


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        torch.testing.assert_close(got[name], t, rtol=0, atol=0)


def _write_index(path: Path, weight_map: dict[str, str]) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _fp8_dir(tmp_path: Path, tensors: dict[str, torch.Tensor], quant: dict | None = FP8_CONFIG) -> Path:
    """Hand-made single-file checkpoint with the given quantization_config (None: no quantisation)."""
    tmp_path.mkdir(exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    config = {"model_type": "qwen3_next"} | ({"quantization_config": quant} if quant is not None else {})
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


# --- plain checkpoints --------------------------------------------------------------------------------------


def test_single_file_round_trip(tmp_path):
    tensors = _tensors()
    write_checkpoint(tmp_path, tensors, {"model_type": "qwen3_next", "hidden_size": 16})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert read_config(tmp_path) == {"model_type": "qwen3_next", "hidden_size": 16}
    _assert_same(_load(tmp_path), tensors)


def test_sharded_round_trip_and_index_format(tmp_path):
    tensors = _tensors()
    write_checkpoint(tmp_path, tensors, {}, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    n = len(files)
    assert n >= 3
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert not (tmp_path / "model.safetensors").exists()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, file in index["weight_map"].items():  # each tensor really is where the index says
        with safe_open(str(tmp_path / file), framework="pt") as f:
            assert name in f.keys()
    _assert_same(_load(tmp_path), tensors)


def test_sharded_by_safetensors_with_hand_made_index(tmp_path):
    tensors = _tensors()
    names = list(tensors)
    save_file({n: tensors[n] for n in names[:2]}, str(tmp_path / "a-part.safetensors"))
    # The second shard holds an extra tensor the index does not list: the index is authoritative.
    save_file({n: tensors[n] for n in names[2:]} | {"stray": torch.ones(2)}, str(tmp_path / "b-part.safetensors"))
    _write_index(tmp_path, {n: "a-part.safetensors" if i < 2 else "b-part.safetensors" for i, n in enumerate(names)})
    _assert_same(_load(tmp_path), tensors)


def test_directory_of_loose_safetensors_files(tmp_path):
    tensors = _tensors()
    names = list(tensors)
    save_file({n: tensors[n] for n in names[3:]}, str(tmp_path / "z.safetensors"))
    save_file({n: tensors[n] for n in names[:3]}, str(tmp_path / "a.safetensors"))
    got = list(iter_checkpoint(tmp_path, progress=False))
    order = [n for n, _ in got]
    assert sorted(order[:3]) == sorted(names[:3])  # files in sorted order: a.safetensors first
    _assert_same(dict(got), tensors)


def test_dtype_casts_floating_tensors_only(tmp_path):
    tensors = _tensors()
    write_checkpoint(tmp_path, tensors, {})
    got = _load(tmp_path, dtype=torch.float32)
    for name, t in tensors.items():
        want = t.to(torch.float32) if t.is_floating_point() else t
        assert got[name].dtype == want.dtype, name
        torch.testing.assert_close(got[name], want, rtol=0, atol=0)
    assert _load(tmp_path, dtype=torch.float16)["model.position_ids"].dtype == torch.int64


def test_progress_bar_does_not_change_output(tmp_path):
    write_checkpoint(tmp_path, _tensors(), {})
    _assert_same(dict(iter_checkpoint(tmp_path, progress=True)), _tensors())


def test_writer_replaces_a_previous_checkpoint(tmp_path):
    write_checkpoint(tmp_path, {"old.weight": torch.ones(2, 2)}, {})
    tensors = _tensors()
    write_checkpoint(tmp_path, tensors, {}, max_shard_bytes=40_000)
    _assert_same(_load(tmp_path), tensors)


# --- FP8 ----------------------------------------------------------------------------------------------------


def _skip_norms(name: str) -> bool:
    return "norm" in name or "embed" in name


@pytest.mark.parametrize("max_shard_bytes", [None, 1])  # 1: every tensor in its own shard, scales apart from weights
def test_fp8_round_trip(tmp_path, max_shard_bytes):
    tensors = _tensors()
    write_checkpoint(
        tmp_path,
        tensors,
        {"x": 1},
        max_shard_bytes=max_shard_bytes,
        fp8_block=(128, 128),
        fp8_skip=_skip_norms,
    )
    config = read_config(tmp_path)
    kept = config["quantization_config"].pop("modules_to_not_convert")
    assert config == {"x": 1, "quantization_config": FP8_CONFIG}
    assert "model.embed_tokens" in kept and not any("q_proj" in m for m in kept)

    quantised = ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.0.down_proj.weight"]
    raw = {}
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            raw |= {k: f.get_tensor(k) for k in f.keys()}
    for name in quantised:
        assert raw[name].dtype == torch.float8_e4m3fn
        assert raw[name + "_scale_inv"].dtype == torch.float32
    assert raw["model.embed_tokens.weight"].dtype == torch.bfloat16  # skipped by fp8_skip

    got = _load(tmp_path)
    assert sorted(got) == sorted(tensors)  # scales consumed, never yielded
    for name, t in tensors.items():
        if name in quantised:
            assert got[name].dtype == torch.bfloat16
            # exactly the dequantisation of what is stored, then close to the original
            want = dequantize_block_fp8(raw[name], raw[name + "_scale_inv"], (128, 128), torch.bfloat16)
            torch.testing.assert_close(got[name], want, rtol=0, atol=0)
            torch.testing.assert_close(got[name].float(), t.float(), rtol=2**-3, atol=1e-2)
        else:
            torch.testing.assert_close(got[name], t, rtol=0, atol=0)
            assert got[name].dtype == t.dtype

    got32 = _load(tmp_path, dtype=torch.float32)
    assert all(got32[n].dtype == torch.float32 for n in quantised)
    assert got32["model.position_ids"].dtype == torch.int64


def test_fp8_hand_made_default_block_and_odd_block(tmp_path):
    w = torch.randn(300, 130)
    wq, s = quantize_block_fp8(w, (128, 128))
    quant = dict(FP8_CONFIG)
    del quant["weight_block_size"]  # absent means [128, 128]
    got = _load(_fp8_dir(tmp_path / "a", {"m.weight": wq, "m.weight_scale_inv": s}, quant), dtype=torch.float32)
    expanded = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:300, :130]
    torch.testing.assert_close(got["m.weight"], wq.float() * expanded, rtol=0, atol=0)

    wq, s = quantize_block_fp8(w, (64, 32))
    d = _fp8_dir(
        tmp_path / "b",
        {"m.weight": wq, "m.weight_scale_inv": s},
        FP8_CONFIG | {"weight_block_size": [64, 32]},
    )
    torch.testing.assert_close(_load(d, dtype=torch.float32)["m.weight"], w, rtol=2**-3, atol=1e-2)


# --- errors: each message must name the offending file or tensor --------------------------------------------


def _raises(path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        list(iter_checkpoint(path, progress=False))
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, msg
    return msg


def test_missing_and_empty_directory(tmp_path):
    _raises(tmp_path / "nope", "nope", "does not exist")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    _raises(tmp_path / "empty", "no safetensors files", "empty")


def test_bad_index(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    _raises(tmp_path, "model.safetensors.index.json")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    _raises(tmp_path, "model.safetensors.index.json", "weight_map")


def test_index_names_missing_shard(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    _write_index(tmp_path, {"a": "s1.safetensors", "layers.1.b": "s2.safetensors"})
    _raises(tmp_path, "s2.safetensors", "layers.1.b")


def test_index_names_tensor_absent_from_shard(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "s1.safetensors"))
    _write_index(tmp_path, {"a": "s1.safetensors", "ghost.weight": "s1.safetensors"})
    _raises(tmp_path, "ghost.weight", "s1.safetensors")


def test_corrupt_safetensors_file(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "good.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    _raises(tmp_path, "junk.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "junk.safetensors").unlink()
    (tmp_path / "good.safetensors").write_bytes(data[:-3])  # truncated
    _raises(tmp_path, "good.safetensors")


def test_duplicate_tensor_across_loose_files(tmp_path):
    save_file({"dup.weight": torch.ones(2)}, str(tmp_path / "a.safetensors"))
    save_file({"dup.weight": torch.ones(2)}, str(tmp_path / "b.safetensors"))
    _raises(tmp_path, "dup.weight", "a.safetensors", "b.safetensors")


def test_fp8_weight_without_scale(tmp_path):
    wq, _ = quantize_block_fp8(torch.randn(8, 8))
    _raises(_fp8_dir(tmp_path, {"layers.0.q_proj.weight": wq}), "layers.0.q_proj.weight", "no scale")


def test_fp8_scale_of_wrong_shape(tmp_path):
    wq, s = quantize_block_fp8(torch.randn(200, 300))
    assert tuple(s.shape) == (2, 3)
    d = _fp8_dir(tmp_path, {"layers.0.q_proj.weight": wq, "layers.0.q_proj.weight_scale_inv": s[:, :2].contiguous()})
    _raises(d, "layers.0.q_proj.weight_scale_inv", "[2, 2]", "[2, 3]")


def test_fp8_scale_without_weight(tmp_path):
    d = _fp8_dir(tmp_path, {"other.weight": torch.ones(2), "layers.0.o_proj.weight_scale_inv": torch.ones(1, 1)})
    _raises(d, "layers.0.o_proj.weight_scale_inv", "no weight")


def test_fp8_scale_without_quantization_config(tmp_path):
    wq, s = quantize_block_fp8(torch.randn(8, 8))
    d = _fp8_dir(tmp_path, {"m.weight": wq, "m.weight_scale_inv": s}, quant=None)
    _raises(d, "m.weight_scale_inv", "quantization_config")


def test_fp8_tensor_in_wrong_format(tmp_path):
    w = torch.randn(8, 8).to(torch.float8_e5m2)
    _raises(_fp8_dir(tmp_path, {"m.weight": w, "m.weight_scale_inv": torch.ones(1, 1)}), "m.weight", "F8_E5M2")


@pytest.mark.parametrize(
    "quant,fragment",
    [
        ({"quant_method": "gptq"}, "gptq"),
        (FP8_CONFIG | {"fmt": "e5m2"}, "e5m2"),
        (FP8_CONFIG | {"activation_scheme": "static"}, "static"),
        (FP8_CONFIG | {"weight_block_size": [128]}, "weight_block_size"),
        (FP8_CONFIG | {"weight_block_size": [0, 128]}, "weight_block_size"),
        (FP8_CONFIG | {"weight_block_size": [True, 128]}, "weight_block_size"),
        (FP8_CONFIG | {"weight_block_size": "128"}, "weight_block_size"),
        (FP8_CONFIG | {"weight_block_size": None}, "weight_block_size"),
    ],
)
def test_unsupported_quantization_config(tmp_path, quant, fragment):
    _raises(_fp8_dir(tmp_path, {"m.weight": torch.ones(2, 2)}, quant), fragment)


def test_read_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(tmp_path)
    save_file({"a": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    _raises(tmp_path, "config.json")  # iter_checkpoint reports a broken config.json too
