"""`nextserve bench fp8-accuracy`: how far block-FP8 compute moves a model from the same model unquantised.

Two measurements, each on one device in one run:
- Teacher-forced agreement (`--model`, default the built-in model, and `--text`): the text is tokenised and cut
  into windows of `--window` tokens; each window is prefilled from empty caches by the unquantised model and by the
  same checkpoint with `--quantization fp8` (an FP8 checkpoint's unquantised twin is its dequantised weights), and
  every position's next-token distributions are compared: top-1 agreement and mean KL(unquantised || FP8) in nats.
- Per-layer error (`--preset NAME --num-layers N`, random weights of a benchmark geometry): an FP8 model and a model
  holding the same FP8 weights dequantised to the run's dtype take the same prompt; after each decoder layer the
  residual stream's relative error ||fp8 - dequantised|| / ||dequantised|| is reported. This isolates what FP8
  *compute* (activation quantisation, FP8 kernels) adds on top of the weights' rounding.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
from pathlib import Path

import torch

from nextserve.engine.engine import resolve_device, resolve_dtype
from nextserve.engine.kv_pool import KVLayout, KVPool
from nextserve.engine.state_pool import StateLayout, StatePool
from nextserve.forward_batch import ForwardBatch
from nextserve.layers.quant import Fp8Config
from nextserve.loader.fp8 import FP8_DTYPE, dequantize_block_fp8
from nextserve.models.qwen3_next import Qwen3NextForCausalLM
from nextserve.ops import backends

PAGE_SIZE = 16


class _Caches:
    """Pools for one sequence of up to `max_len` tokens, bound to the model; `reset` empties the state slot."""

    def __init__(self, model: Qwen3NextForCausalLM, max_len: int, device: torch.device):
        attn, gdn = model.attention_layers(), model.linear_attention_layers()
        pages = -(-max_len // PAGE_SIZE)
        kv = KVPool(KVLayout(len(attn), PAGE_SIZE, attn[0].num_kv_heads, attn[0].head_dim, model.dtype), pages, device)
        c = model.config
        layout = StateLayout(
            len(gdn), gdn[0].conv1d.weight.shape[0], c.linear_conv_kernel_dim, gdn[0].hv, gdn[0].dk, gdn[0].dv,
            model.dtype, torch.float32,
        )  # fmt: skip
        self.states = StatePool(layout, 1, device)
        for i, a in enumerate(attn):
            a.k_cache, a.v_cache = kv.k[i], kv.v[i]
        for i, g in enumerate(gdn):
            g.conv_state, g.ssm_state = self.states.conv[i], self.states.ssm[i]
        self.pages = list(range(1, pages + 1))  # page 0 and slot 0 are the pools' dummies
        self.device = device

    def batch(self, n: int, logits: bool) -> ForwardBatch:
        self.states.conv[:, 1].zero_()  # a new sequence starts from the zero state
        self.states.ssm[:, 1].zero_()
        pages = self.pages[: -(-n // PAGE_SIZE)]
        rows = list(range(n)) if logits else None
        return ForwardBatch.build([n], [0], [1], [pages], PAGE_SIZE, logits_indices=rows, device=self.device)


@torch.inference_mode()
def window_logits(model: Qwen3NextForCausalLM, caches: _Caches, ids: torch.Tensor) -> torch.Tensor:
    """Logits [n, V] (fp32) at every position of one window prefilled from empty caches."""
    batch = caches.batch(ids.numel(), logits=True)
    return model.compute_logits(model(ids, batch)[batch.logits_indices]).float()


def compare_logits(ref: torch.Tensor, test: torch.Tensor) -> tuple[int, float]:
    """(positions whose argmax agrees, summed KL(softmax(ref) || softmax(test)) in nats) over rows."""
    agree = int((ref.argmax(-1) == test.argmax(-1)).sum())
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(test, -1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).clamp(min=0).sum())
    return agree, kl


def agreement(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from nextserve.engine.engine import _default_model_dir
    from nextserve.loader.model_loader import load_model, load_tokenizer, resolve_quantization
    from nextserve.model_config import ModelConfig

    model_dir = Path(args.model) if args.model else _default_model_dir()
    cfg = ModelConfig.from_pretrained(model_dir)
    text = Path(args.text).read_text()
    ids = load_tokenizer(model_dir)(text, add_special_tokens=False)["input_ids"]
    if args.skip_fraction:
        ids = ids[int(len(ids) * args.skip_fraction) :]
    windows = math.ceil(args.positions / args.window)
    if len(ids) < windows * args.window:
        raise ValueError(f"{args.text} gives {len(ids)} tokens; {windows} windows of {args.window} need more")
    chunks = [torch.tensor(ids[i * args.window : (i + 1) * args.window], device=device) for i in range(windows)]

    def run(quant) -> list[torch.Tensor]:
        model = load_model(model_dir, cfg, dtype=dtype, device=device, with_mtp=False, progress=False, quant=quant)
        caches = _Caches(model, args.window, device)
        out = [window_logits(model, caches, c).cpu() for c in chunks]
        del model, caches
        return out

    base = run(None)
    fp8 = run(resolve_quantization(model_dir, "fp8"))
    agree, kl, n = 0, 0.0, 0
    for a, b in zip(base, fp8):
        ag, k = compare_logits(a, b)
        agree, kl, n = agree + ag, kl + k, n + a.shape[0]
    return {"model": str(model_dir), "text": args.text, "positions": n, "window": args.window,
            "top1_agreement": agree / n, "mean_kl_nats": kl / n}  # fmt: skip


@torch.no_grad()
def dequantised_twin(model: Qwen3NextForCausalLM, device: torch.device) -> Qwen3NextForCausalLM:
    """A model of the same geometry without FP8, holding `model`'s FP8 weights dequantised to its dtype."""
    with torch.device(device):
        twin = Qwen3NextForCausalLM(model.config, dtype=model.dtype, with_mtp=model.mtp is not None)
    src = dict(model.named_parameters())
    for name, p in twin.named_parameters():
        w = src[name]
        if w.dtype != FP8_DTYPE:
            p.copy_(w)
        elif w.dim() == 2:
            p.copy_(dequantize_block_fp8(w, src[name + "_scale_inv"], model.quant.block, model.dtype))
        else:  # packed experts, one at a time (gate and up blocked apart)
            from nextserve.ops.fp8 import dequantize_w13

            scale = src[name + "_scale_inv"]
            for e in range(w.shape[0]):
                if name.endswith("gate_up_proj"):
                    p[e] = dequantize_w13(w[e], scale[e], model.quant.block).to(model.dtype)
                else:
                    p[e] = dequantize_block_fp8(w[e], scale[e], model.quant.block, model.dtype)
    return twin.eval()


@torch.inference_mode()
def layer_outputs(model: Qwen3NextForCausalLM, caches: _Caches, ids: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream (h + residual) after every decoder layer, fp32 [T, H] each."""
    outs: list[torch.Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda m, inp, out: outs.append((out[0] + out[1]).float()))
        for layer in model.model.layers
    ]
    try:
        model(ids, caches.batch(ids.numel(), logits=False))
    finally:
        for h in hooks:
            h.remove()
    return outs


def per_layer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    from nextserve.bench.presets import init_random_weights, preset_config

    cfg = preset_config(args.preset, args.num_layers)
    with torch.device(device):
        model = Qwen3NextForCausalLM(cfg, dtype=dtype, with_mtp=False, quant=Fp8Config())
    init_random_weights(model, args.seed)
    model.eval()
    ids = torch.randint(cfg.vocab_size, (args.tokens,), device=device, generator=None)
    caches = _Caches(model, args.tokens, device)
    fp8_out = layer_outputs(model, caches, ids)
    twin = dequantised_twin(model, device)
    del model
    caches = _Caches(twin, args.tokens, device)
    ref_out = layer_outputs(twin, caches, ids)
    errors = [float((a - b).norm() / b.norm()) for a, b in zip(fp8_out, ref_out)]
    kinds = list(cfg.layer_types)
    return {"preset": args.preset, "num_layers": cfg.num_hidden_layers, "tokens": args.tokens,
            "layers": [{"layer": i, "type": kinds[i], "relative_error": e} for i, e in enumerate(errors)]}  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint folder for the agreement run (default: built-in)")
    parser.add_argument("--text", default=None, help="text file: teacher-forced agreement over its tokens")
    parser.add_argument("--positions", type=int, default=4096, help="positions compared (rounded up to windows)")
    parser.add_argument("--window", type=int, default=512, help="tokens per teacher-forced window")
    parser.add_argument("--skip-fraction", type=float, default=0.9, help="start this far into the text's tokens")
    parser.add_argument("--preset", default=None, help="per-layer error on random weights of this geometry")
    parser.add_argument("--num-layers", type=int, default=None, help="first N layers of the preset")
    parser.add_argument("--tokens", type=int, default=512, help="prompt length of the per-layer run")
    parser.add_argument("--dtype", default="bfloat16", choices=("auto", "bfloat16", "float16", "float32"))
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-json", default=None)


def run(args: argparse.Namespace) -> int:
    if (args.text is None) == (args.preset is None):
        raise ValueError("give --text (teacher-forced agreement) or --preset (per-layer error)")
    if args.positions < 1 or args.window < 2 or args.tokens < 1 or not 0 <= args.skip_fraction < 1:
        raise ValueError("--positions, --window and --tokens must be positive; --skip-fraction in [0, 1)")
    device = resolve_device(args.device)
    backends.select(device)  # refuses a GPU run whose fast paths failed to import
    dtype = resolve_dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    result = agreement(args, device, dtype) if args.text else per_layer(args, device, dtype)
    result |= {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).removeprefix("torch."),
               "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}  # fmt: skip
    if "layers" in result:
        print(f"{'layer':>6} {'type':<18} {'relative error':>15}")
        for row in result["layers"]:
            print(f"{row['layer']:>6} {row['type']:<18} {row['relative_error']:>15.5f}")
    else:
        print(
            f"{result['positions']} positions: top-1 agreement {result['top1_agreement']:.4f}, "
            f"mean KL {result['mean_kl_nats']:.5f} nats ({result['dtype']} vs FP8 on {result['device']})"
        )
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return 0
