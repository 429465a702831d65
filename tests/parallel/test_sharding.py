"""What each rank holds, checked without a process group (building and loading a rank's model never talks to the
other ranks): every parameter is its shard of the TP1 parameter, from a checkpoint and from dummy weights (FP8
scales too); per-rank cache shapes; invalid TP sizes and FP8 blocks cut by a shard are clear errors at build time;
the multi-node numbering."""

import pytest
import torch
from tiny import TP_V3K, hf_model, mtp_tensors, per_expert, tiny_config, write_tiny_checkpoint

from nextserve.layers.quant import Fp8Config
from nextserve.layers.shard import Split, Take
from nextserve.loader import write_checkpoint
from nextserve.loader.checkpoint import fp8_modules
from nextserve.loader.model_loader import build_dummy_model, load_model
from nextserve.model_config import ModelConfig
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.models.sharding import check_tp_size
from nextserve.parallel import Communicator, ParallelConfig, ParallelContext

CFG = tiny_config(**TP_V3K, num_nextn_predict_layers=1)
CPU = torch.device("cpu")


def _rank(rank: int, size: int):
    ctx = ParallelContext(rank, size)
    return dict(ctx=ctx, comm=Communicator(ctx))


def _assert_shards(full: torch.nn.Module, ranks: list[torch.nn.Module]) -> None:
    want = dict(full.named_parameters())
    for model in ranks:
        got = dict(model.named_parameters())
        assert got.keys() == want.keys()
        for name, p in got.items():
            assert torch.equal(p.float(), p.shard_fn(want[name]).float()), name


@pytest.mark.parametrize("tp", [2, 4])
def test_loaded_ranks_hold_their_shards(tmp_path, tp):
    write_tiny_checkpoint(tmp_path, CFG, mtp=True, tokenizer=False)
    mc = ModelConfig.from_pretrained(tmp_path)
    kw = dict(dtype=torch.float32, device=CPU, with_mtp=True, progress=False)
    full = load_model(tmp_path, mc, **kw)
    ranks = [load_model(tmp_path, mc, **kw, **_rank(r, tp)) for r in range(tp)]
    _assert_shards(full, ranks)
    # Cache shapes the engine sizes its pools from are per rank: nothing of the recurrent state is replicated.
    g = ranks[0].linear_attention_layers()[0]
    assert (g.hk, g.hv, g.conv1d.weight.shape[0]) == (4 // tp, 12 // tp, mc.linear_conv_dim // tp)
    assert ranks[0].attention_layers()[0].num_kv_heads == max(1, 2 // tp)
    # The KV heads: split at TP2, one per rank beyond (ranks r and r+1 share head r // 2 at TP4).
    heads = full.attention_layers()[0].k_proj.weight.view(2, -1, mc.hidden_size)  # [Hkv, D, H]
    for r, m in enumerate(ranks):
        assert torch.equal(m.attention_layers()[0].k_proj.weight, heads[r * 2 // tp])


_KEEP = ("embed_tokens", "lm_head", "norm", "mlp.gate.", "shared_expert_gate", "in_proj_ba", "conv1d", "A_log")


@pytest.mark.parametrize("stored", [False, True], ids=["quantised-on-load", "fp8-checkpoint"])
def test_fp8_ranks_hold_their_shards_of_weights_and_scales(tmp_path, stored):
    """16x16 blocks, TP2: every share is whole blocks, so the rank's quantised share (--quantization fp8) and its
    cut of a stored FP8 checkpoint's per-expert scales are the shards of the TP1 model's."""
    state = {k: v.detach().clone() for k, v in hf_model(CFG, 4).state_dict().items()}
    state.update(mtp_tensors(per_expert(state), CFG))
    config = dict(CFG, model_type="qwen3_next", architectures=["Qwen3NextForCausalLM"])
    fp8 = dict(fp8_block=(16, 16), fp8_skip=lambda n: any(k in n for k in _KEEP)) if stored else {}
    write_checkpoint(tmp_path, per_expert(state), config, **fp8)
    quant = Fp8Config((16, 16), modules=fp8_modules(tmp_path) if stored else None)
    mc = ModelConfig.from_pretrained(tmp_path)
    kw = dict(dtype=torch.float32, device=CPU, with_mtp=True, progress=False, quant=quant)
    full = load_model(tmp_path, mc, **kw)
    assert full.model.layers[0].mlp.experts.down_proj_scale_inv.shape == (8, 2, 2)
    _assert_shards(full, [load_model(tmp_path, mc, **kw, **_rank(r, 2)) for r in range(2)])


@pytest.mark.parametrize("quant", [None, Fp8Config((16, 16))], ids=["bf16", "fp8"])
def test_dummy_ranks_are_shards_of_the_tp1_dummy_model(quant):
    mc = ModelConfig.from_dict(CFG)
    full = build_dummy_model(mc, torch.float32, CPU, True, quant, seed=5)
    ranks = [build_dummy_model(mc, torch.float32, CPU, True, quant, seed=5, **_rank(r, 2)) for r in range(2)]
    _assert_shards(full, ranks)
    if quant is not None:
        exp = ranks[1].model.layers[0].mlp.experts
        assert exp.gate_up_proj.dtype == torch.float8_e4m3fn and exp.gate_up_proj_scale_inv.shape == (8, 2, 2)


@pytest.mark.parametrize(
    "overrides, tp, message",
    [
        (dict(), 3, "num_attention_heads=4 is not divisible by 3"),
        (dict(num_attention_heads=8, linear_num_key_heads=2), 4, "linear_num_key_heads=2 is not divisible by 4"),
        (dict(num_attention_heads=12, num_key_value_heads=4), 6, "num_key_value_heads=4 neither divides"),
        (dict(vocab_size=97), 2, "vocab_size=97"),
        (dict(moe_intermediate_size=18), 4, "moe_intermediate_size=18"),
    ],
)
def test_invalid_tp_sizes_are_clear_errors(overrides, tp, message):
    mc = ModelConfig.from_dict(tiny_config(**overrides))
    with pytest.raises(ValueError, match=message):
        check_tp_size(mc, tp)
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        Qwen3NextForCausalLM(mc, **_rank(0, tp))


def test_fp8_blocks_cut_by_tp8_are_refused_before_loading():
    """The 80B geometry with 128x128 blocks: TP4 leaves each rank 128 expert columns (one block), TP8 64."""
    mc, quant = ModelConfig(), Fp8Config((128, 128))
    check_tp_size(mc, 4, quant)
    with pytest.raises(ValueError, match=r"FP8 model\.layers\.0\.mlp\.experts: 64 rows per rank cut a 128-wide block"):
        check_tp_size(mc, 8, quant)
    check_tp_size(mc, 8)  # unquantised TP8 is fine
    # The layer constructors refuse it too (whatever the config check missed).
    with pytest.raises(ValueError, match="FP8 block 128 is cut"):
        Split(ParallelContext(0, 8), 1, (512, 512)).for_blocks(128)
    with pytest.raises(ValueError, match="not whole blocks"):
        Take(0, 64, 128, 256).for_blocks(128)


def test_communicator_of_another_rank_is_refused():
    with pytest.raises(ValueError, match="communicator"), torch.device("meta"):
        Qwen3NextForCausalLM(ModelConfig.from_dict(CFG), ctx=ParallelContext(0, 2), comm=Communicator())


def test_multi_node_numbering():
    pc = ParallelConfig(tp_size=8, nnodes=2, node_rank=1, dist_init_addr="10.0.0.1:29500")
    assert pc.ranks_per_node == 4 and pc.global_rank(0) == 4 and pc.global_rank(3) == 7
    assert pc.init_method == "tcp://10.0.0.1:29500" and ParallelConfig(2).init_method == "env://"
    with pytest.raises(ValueError, match="local rank 4"):
        pc.global_rank(4)
    for bad, match in [
        (dict(tp_size=4, nnodes=3), "--nnodes 3 must divide"),
        (dict(tp_size=4, nnodes=2, node_rank=2), "--node-rank 2"),
        (dict(tp_size=2, dist_init_addr="nohost"), "host:port"),
        (dict(tp_size=0), "--tp-size"),
    ]:
        with pytest.raises(ValueError, match=match):
            ParallelConfig(**bad)
