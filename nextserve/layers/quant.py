"""Which of the model's weights are block-FP8 (`Fp8Config`), decided once, before the model is built.

An FP8 checkpoint says it module by module: a weight that has a `weight_scale_inv` sibling is FP8, every other one
(the ones `quantization_config.modules_to_not_convert` lists) stays in the model dtype, so the set of FP8 modules is
read from the checkpoint's scales (`modules`). `--quantization fp8` on a bf16 checkpoint, and dummy FP8 weights,
follow the official Qwen3-Next FP8 checkpoints' rule instead: every projection is FP8 except the embedding, lm_head,
the router (`mlp.gate`), `shared_expert_gate` and `in_proj_ba`; norms, conv1d, A_log and dt_bias are no linears and
stay as they are.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

# Linears the official FP8 checkpoints keep in bf16 (tiny outputs, or read at full precision by the routing).
_KEEP_BF16 = re.compile(r"(^|\.)(lm_head|embed_tokens|mlp\.gate|shared_expert_gate|in_proj_ba)$")


@dataclass(frozen=True)
class Fp8Config:
    block: tuple[int, int] = (128, 128)  # weight block [rows, columns]; activations are grouped by columns
    modules: frozenset[str] | None = None  # exactly these modules are FP8 (an FP8 checkpoint's); None: the rule
    skip: tuple[str, ...] = ()  # with the rule: modules (or module prefixes) kept in the model dtype

    def block_for(self, name: str) -> tuple[int, int] | None:
        """The weight block of module `name` when it is FP8, else None."""
        if self.modules is not None:
            return self.block if name in self.modules else None
        if any(name == s or name.startswith(s + ".") for s in self.skip) or _KEEP_BF16.search(name):
            return None
        return self.block


def fp8_block(quant: Fp8Config | None, name: str) -> tuple[int, int] | None:
    return quant.block_for(name) if quant is not None else None


def fp8_blocks(quant: Fp8Config | None, prefix: str) -> Callable[[str], tuple[int, int] | None]:
    """For the modules under `prefix`: child name -> its FP8 block, or None when it is not FP8."""
    return lambda name: fp8_block(quant, f"{prefix}.{name}")
