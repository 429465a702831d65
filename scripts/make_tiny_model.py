"""Build the tiny built-in Qwen3-Next model shipped in ``nextserve/assets/tiny-qwen3-next/``.

Contract: running this script with the same corpus and flags rewrites the same folder with the same files
(fixed seeds, single-threaded tokenizer training, CPU training for fixed step counts; the --train-seconds budget
only cuts a run short on a slow machine, and then says so):

    python scripts/make_tiny_model.py                       # tokenizer + weights (~9 min on 2 idle CPU cores)
    python scripts/make_tiny_model.py --tokenizer-only      # tokenizer, chat template, configs only

Stage 1 trains a byte-level BPE tokenizer (~1000 merges) on tinyshakespeare and appends Qwen's 26 added tokens
in Qwen's order, so token *strings* and their relative order match the real model (ids do not: they start right
after the learned vocabulary). Stage 2 trains a 4-layer ``Qwen3NextForCausalLM`` (3 Gated DeltaNet + 1 gated
attention layer, 8-expert MoE) with transformers on CPU, adds and trains an MTP module on the frozen model, and
saves the checkpoint in bf16 with the per-expert tensor names of the real Qwen3-Next checkpoints. The corpus is
read here only; the package ships the result and never reads the corpus at run time.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "nextserve" / "assets" / "tiny-qwen3-next"
DEFAULT_CORPUS_CANDIDATES = (
    Path("/work/shared/data/corpus/tinyshakespeare.txt"),
    REPO_ROOT.parent / "shared" / "data" / "corpus" / "tinyshakespeare.txt",
)

SEED = 1234
NUM_MERGES = 1000
MAX_CONTEXT = 4096

# Qwen's added tokens, ids 151643..151668 of the real tokenizer, in that order. The flag says whether Qwen marks
# the token "special" (stripped by skip_special_tokens); tool-call, FIM and think markers are added but not special.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

# GPT-4 / Qwen-style pre-tokenisation split: contractions, letter runs with one leading non-letter, single digits,
# punctuation runs, newline runs and whitespace. Applied before the byte-level mapping so merges never cross
# these boundaries. No Unicode normaliser: NFC would break exact round-trips of decomposed text.
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ChatML template with the behaviour of the Qwen3 2507-family templates (structure only; wording is our own):
# - tools: a system turn is always emitted (user system text + blank line, "# Tools", one JSON line per tool
#   inside <tools></tools>, then how to format a call);
# - assistant tool_calls follow the content as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>,
#   separated by "\n" (and preceded by one when content is non-empty);
# - consecutive tool messages merge into one user turn of <tool_response> blocks;
# - reasoning: an assistant turn's reasoning_content (or a "<think>...</think>" prefix of its content) is dropped
#   for turns before the last real user query and re-rendered as "<think>\n...\n</think>\n\n" after it
#   (multi-step tool use); Instruct-style generation prompt, with "<think>\n" only when enable_thinking is true.
# Content may be a string or a list of OpenAI-style parts ({"type": "text", "text": ...}); other parts are ignored.
CHAT_TEMPLATE = r"""{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- elif content is iterable and content is not mapping -%}
        {%- for part in content -%}
            {%- if part is mapping and part.type == 'text' -%}{{- part.text -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if messages and messages[0].role == 'system' -%}
        {{- text_of(messages[0].content) + '\n\n' -}}
    {%- endif -%}
    {{- '# Tools\n\nYou can call the functions below to help answer the user.\n\n' -}}
    {{- 'Their signatures are listed inside <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nTo call a function, write one JSON object with its name and arguments inside ' -}}
    {{- '<tool_call></tool_call> XML tags, one block per call:\n' -}}
    {{- '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif messages and messages[0].role == 'system' -%}
    {{- '<|im_start|>system\n' + text_of(messages[0].content) + '<|im_end|>\n' -}}
{%- endif -%}
{#- The last real user query: a user turn that is not a bare tool response. Reasoning survives only after it. -#}
{%- set ns = namespace(last_query=-1) -%}
{%- for message in messages -%}
    {%- if message.role == 'user' -%}
        {%- set text = text_of(message.content) -%}
        {%- if not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) -%}
            {%- set ns.last_query = loop.index0 -%}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set content = text_of(message.content) -%}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) -%}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set reasoning = '' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- endif -%}
        {%- if '</think>' in content -%}
            {%- if not reasoning -%}
                {%- set reasoning = content.split('</think>')[0].split('<think>')[-1] -%}
            {%- endif -%}
            {%- set content = content.split('</think>')[-1].lstrip('\n') -%}
        {%- endif -%}
        {%- set reasoning = reasoning.strip('\n') -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- if reasoning and loop.index0 > ns.last_query -%}
            {{- '<think>\n' + reasoning + '\n</think>\n\n' + content.lstrip('\n') -}}
        {%- else -%}
            {{- content -}}
        {%- endif -%}
        {%- for call in (message.tool_calls or []) -%}
            {%- if not loop.first or content -%}{{- '\n' -}}{%- endif -%}
            {%- set fn = call.function if call.function is defined else call -%}
            {{- '<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
            {%- if fn.arguments is string -%}
                {{- fn.arguments -}}
            {%- else -%}
                {{- fn.arguments | tojson -}}
            {%- endif -%}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}
            {{- '<|im_start|>user' -}}
        {%- endif -%}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' -}}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}
            {{- '<|im_end|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<think>\n' -}}
    {%- endif -%}
{%- endif -%}
"""


# --------------------------------------------------------------------------------------------------------------
# Stage 1: tokenizer, chat template, tokenizer config
# --------------------------------------------------------------------------------------------------------------


def build_tokenizer(corpus_text: str):
    """Train the byte-level BPE on the corpus and append Qwen's added tokens after the learned vocabulary."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            # add_prefix_space=False keeps the text exactly; use_regex=False because Split already segmented.
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(alphabet) + NUM_MERGES,
        min_frequency=2,
        initial_alphabet=alphabet,
        show_progress=False,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(corpus_text.splitlines(keepends=True), trainer=trainer)
    # Added tokens must start right after the learned vocabulary; catch a trainer that stops short of NUM_MERGES.
    assert tokenizer.get_vocab_size() == len(alphabet) + NUM_MERGES, tokenizer.get_vocab_size()
    for content, special in QWEN_ADDED_TOKENS:
        token = AddedToken(content, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    return tokenizer


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids the model config and generation config refer to."""
    ids = {name: tokenizer.token_to_id(name) for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert all(i is not None for i in ids.values()), ids
    return ids


def padded_vocab_size(tokenizer) -> int:
    """Tokenizer length rounded up to a multiple of 64 (the extra embedding rows are padding, as in Qwen)."""
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    return (n + 63) // 64 * 64


def write_tokenizer_files(tokenizer, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / "tokenizer.json"), pretty=True)
    added_decoder = {
        str(tokenizer.token_to_id(content)): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for content, special in QWEN_ADDED_TOKENS
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": MAX_CONTEXT,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": False,
        "errors": "replace",
        "added_tokens_decoder": added_decoder,
        "additional_special_tokens": [c for c, special in QWEN_ADDED_TOKENS if special and c != "<|endoftext|>"],
        "chat_template": CHAT_TEMPLATE,
    }
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(
        out_dir / "special_tokens_map.json",
        {
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "additional_special_tokens": tokenizer_config["additional_special_tokens"],
        },
    )
    # transformers 5 also reads chat_template.jinja; a plain file is handy for engines that render with jinja2.
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Stage 2: config, training, MTP, checkpoint
# --------------------------------------------------------------------------------------------------------------

HIDDEN = 128
SEQ_LEN = 256
BATCH = 8
CHAT_SAMPLES = 600
CHAT_ROW_FRACTION = 0.25  # share of training rows drawn from the ChatML stream


def build_config(tokenizer) -> dict:
    """Raw config.json keys, spelled as in the real Qwen3-Next checkpoints (spec section 1)."""
    ids = special_token_ids(tokenizer)
    return {
        "architectures": ["Qwen3NextForCausalLM"],
        "model_type": "qwen3_next",
        "vocab_size": padded_vocab_size(tokenizer),
        "hidden_size": HIDDEN,
        "num_hidden_layers": 4,
        "full_attention_interval": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 32,
        "linear_value_head_dim": 32,
        "linear_conv_kernel_dim": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
        "intermediate_size": 256,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.25,
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": MAX_CONTEXT,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "use_sliding_window": False,
        "router_aux_loss_coef": 0.001,
        "output_router_logits": False,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "num_nextn_predict_layers": 1,
        "torch_dtype": "bfloat16",
    }


def build_generation_config(tokenizer) -> dict:
    ids = special_token_ids(tokenizer)
    return {
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
        "pad_token_id": ids["<|endoftext|>"],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "top_k": 20,
    }


def chat_samples(corpus_text: str, count: int, rng: random.Random) -> list[str]:
    """ChatML conversations cut from the corpus: user = one line, assistant = the next one to three lines."""
    lines = [line.strip() for line in corpus_text.splitlines()]
    samples = []
    while len(samples) < count:
        i = rng.randrange(len(lines) - 4)
        n_reply = rng.randint(1, 3)
        user, reply = lines[i], lines[i + 1 : i + 1 + n_reply]
        # Both turns stay inside one speech: no blank lines and no speaker headings ("ROMEO:"). A heading as the
        # user turn would teach the model that "ROMEO:" is followed by <|im_end|>, also in plain text.
        if not all(line and not line.endswith(":") for line in [user, *reply]):
            continue
        system = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" if rng.random() < 0.2 else ""
        samples.append(
            f"{system}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n" + "\n".join(reply) + "<|im_end|>\n"
        )
    return samples


class BatchSampler:
    """Random (BATCH, SEQ_LEN + 1) windows, a fixed share from the ChatML stream and the rest from the corpus.

    Windows start only at line starts (corpus) or conversation starts (chat). A prompt such as "ROMEO:" is then a
    familiar sequence start, and every <|im_end|> the model sees has its <|im_start|> in view, so the model does
    not learn to end plain text with <|im_end|>.
    """

    def __init__(self, corpus_ids: list[int], corpus_starts: list[int], chat_ids: list[int], chat_starts: list[int]):
        import torch

        self.corpus = torch.tensor(corpus_ids, dtype=torch.long)
        self.chat = torch.tensor(chat_ids, dtype=torch.long)
        self.corpus_starts = torch.tensor([s for s in corpus_starts if s + SEQ_LEN + 1 <= len(corpus_ids)])
        self.chat_starts = torch.tensor([s for s in chat_starts if s + SEQ_LEN + 1 <= len(chat_ids)])
        self.generator = torch.Generator().manual_seed(SEED)
        self.n_chat = round(BATCH * CHAT_ROW_FRACTION)

    def _windows(self, stream, starts, n: int):
        import torch

        picks = torch.randint(0, len(starts), (n,), generator=self.generator)
        return torch.stack([stream[s : s + SEQ_LEN + 1] for s in starts[picks].tolist()])

    def next(self):
        import torch

        rows = torch.cat(
            [
                self._windows(self.corpus, self.corpus_starts, BATCH - self.n_chat),
                self._windows(self.chat, self.chat_starts, self.n_chat),
            ]
        )
        return rows[:, :-1], rows[:, 1:]  # inputs, next-token targets: (B, T)


def make_sampler(tokenizer, corpus_text: str) -> BatchSampler:
    corpus_ids = tokenizer.encode(corpus_text).ids
    # Byte-level BPE spells "\n" as "Ċ"; a line starts after any token ending in a newline.
    newline_ids = {i for token, i in tokenizer.get_vocab().items() if token.endswith("Ċ")}
    corpus_starts = [0] + [i + 1 for i, t in enumerate(corpus_ids) if t in newline_ids]
    chat_ids: list[int] = []
    chat_starts: list[int] = []
    for sample in chat_samples(corpus_text, CHAT_SAMPLES, random.Random(SEED)):
        chat_starts.append(len(chat_ids))
        chat_ids += tokenizer.encode(sample).ids
    return BatchSampler(corpus_ids, corpus_starts, chat_ids, chat_starts)


def train_model(config_dict: dict, tokenizer, corpus_text: str, args: argparse.Namespace, deadline: float):
    """Train Qwen3NextForCausalLM in fp32 on CPU with AdamW and a warmup + cosine schedule over --max-steps.

    The wall-clock budget (--train-seconds) only cuts training short on a slow machine; on the reference machine
    the step cap ends it, which is what makes the weights reproducible.
    """
    import math

    import torch
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(SEED)
    hf_config = Qwen3NextConfig(**_hf_config_kwargs(config_dict))
    hf_config._attn_implementation = "sdpa"
    model = Qwen3NextForCausalLM(hf_config).float().train()
    sampler = make_sampler(tokenizer, corpus_text)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = min(100, args.max_steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.max_steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    t0 = time.time()
    for step in range(args.max_steps):
        if time.time() > deadline:
            print(f"WARNING: time budget reached after {step} of {args.max_steps} steps; weights are not reproducible")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        inputs, targets = sampler.next()
        logits = model(input_ids=inputs, use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.max_steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  {time.time() - t0:6.0f}s", flush=True)
    return model.eval(), sampler


def _hf_config_kwargs(config_dict: dict) -> dict:
    """config.json keys -> Qwen3NextConfig kwargs (transformers 5 wants rope_parameters, not rope_theta)."""
    kwargs = {k: v for k, v in config_dict.items() if k not in ("architectures", "model_type", "torch_dtype")}
    kwargs["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": kwargs.pop("rope_theta"),
        "partial_rotary_factor": kwargs.pop("partial_rotary_factor"),
    }
    kwargs.pop("rope_scaling")
    kwargs.pop("num_nextn_predict_layers")
    return kwargs


class TinyMTP:
    """The MTP module of spec section 10 built from transformers' own layers, for training it only.

    Step for position t: u = fc(concat(norm_e(embed(x_{t+1})), norm_h(h_t))), one full-attention MoE decoder
    layer at RoPE position t, then norm and the shared lm_head predict x_{t+2}. h_t is the main model's final
    hidden state after model.norm. The main model stays frozen; its embedding and head are shared, not trained.
    """

    def __init__(self, model, config_dict: dict):
        import torch
        from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextDecoderLayer, Qwen3NextRMSNorm

        hidden = config_dict["hidden_size"]
        self.last_full = config_dict["num_hidden_layers"] - 1
        assert model.config.layer_types[self.last_full] == "full_attention", "MTP copies a full-attention layer"
        generator = torch.Generator().manual_seed(SEED + 1)
        self.fc = torch.nn.Linear(2 * hidden, hidden, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(hidden, 2 * hidden, generator=generator) * 0.02)
        # Zero-centred norms: zeros mean gain 1.
        self.pre_fc_norm_embedding = Qwen3NextRMSNorm(hidden, eps=config_dict["rms_norm_eps"])
        self.pre_fc_norm_hidden = Qwen3NextRMSNorm(hidden, eps=config_dict["rms_norm_eps"])
        self.norm = Qwen3NextRMSNorm(hidden, eps=config_dict["rms_norm_eps"])
        self.layer = Qwen3NextDecoderLayer(model.config, layer_idx=self.last_full)
        self.layer.load_state_dict(model.model.layers[self.last_full].state_dict())
        self.model = model

    def modules(self) -> dict:
        return {
            "fc": self.fc,
            "pre_fc_norm_embedding": self.pre_fc_norm_embedding,
            "pre_fc_norm_hidden": self.pre_fc_norm_hidden,
            "norm": self.norm,
            "layers.0": self.layer,
        }

    def parameters(self) -> list:
        return [p for module in self.modules().values() for p in module.parameters()]

    def loss(self, inputs, targets):
        import torch

        with torch.no_grad():
            # (B, T, H): final hidden states after model.norm, i.e. what feeds lm_head.
            hidden = self.model.model(input_ids=inputs, use_cache=False).last_hidden_state
        # Slot t pairs h_t with token x_{t+1} (= targets[:, t]) and predicts x_{t+2} (= targets[:, t+1]).
        embeds = self.model.model.embed_tokens(targets[:, :-1])
        u = self.fc(torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden[:, :-1])], -1))
        positions = torch.arange(u.shape[1]).expand(u.shape[0], -1)
        rope = self.model.model.rotary_emb(u, positions)
        # attention_mask=None makes the sdpa path causal.
        out = self.norm(self.layer(u, position_embeddings=rope, position_ids=positions))
        logits = self.model.lm_head(out)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets[:, 1:].flatten())

    def state_dict(self) -> dict:
        return {
            f"mtp.{prefix}.{name}": t.detach()
            for prefix, module in self.modules().items()
            for name, t in module.state_dict().items()
        }


def train_mtp(model, config_dict: dict, sampler: BatchSampler, args: argparse.Namespace, deadline: float) -> dict:
    """Train the MTP module for --mtp-steps on the frozen main model; returns its mtp.* tensors (fp32)."""
    import torch

    torch.manual_seed(SEED + 2)
    model.requires_grad_(False)
    mtp = TinyMTP(model, config_dict)
    optimizer = torch.optim.AdamW(mtp.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    t0 = time.time()
    for step in range(args.mtp_steps):
        if time.time() > deadline:
            print(f"WARNING: time budget reached after {step} of {args.mtp_steps} MTP steps; not reproducible")
            break
        inputs, targets = sampler.next()
        loss = mtp.loss(inputs, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.mtp_steps - 1:
            print(f"mtp step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:6.0f}s", flush=True)
    return mtp.state_dict()


def checkpoint_tensors(model, mtp_tensors: dict) -> dict:
    """Main model + MTP tensors renamed to the real checkpoint layout, all bf16.

    transformers 5 keeps experts fused (experts.gate_up_proj [E, 2I, H], gate rows first; experts.down_proj
    [E, H, I]); Qwen checkpoints store one 2-D tensor per expert and projection (spec section 2).
    """
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for name, weight in {**model.state_dict(), **mtp_tensors}.items():
        weight = weight.detach()
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = weight.chunk(2, dim=1)  # (E, I, H) each
            for e in range(weight.shape[0]):
                tensors[f"{prefix}{e}.gate_proj.weight"] = gate[e]
                tensors[f"{prefix}{e}.up_proj.weight"] = up[e]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix("down_proj")
            for e in range(weight.shape[0]):
                tensors[f"{prefix}{e}.down_proj.weight"] = weight[e]
        else:
            tensors[name] = weight
    return {name: t.to(torch.bfloat16).contiguous() for name, t in sorted(tensors.items())}


def train_and_save(tokenizer, corpus_text: str, args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    torch.set_num_threads(args.threads)
    config_dict = build_config(tokenizer)
    # One wall-clock budget for both phases; the step counts, not the clock, decide the weights.
    deadline = time.time() + args.train_seconds
    model, sampler = train_model(config_dict, tokenizer, corpus_text, args, deadline)
    mtp_tensors = train_mtp(model, config_dict, sampler, args, deadline)
    tensors = checkpoint_tensors(model, mtp_tensors)
    path = args.out / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors writes 0600; the file ships in a package
    n_params = sum(t.numel() for t in tensors.values())
    print(f"saved {len(tensors)} tensors, {n_params:,} parameters")


# --------------------------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------------------------


def _default_corpus() -> Path:
    for candidate in DEFAULT_CORPUS_CANDIDATES:
        if candidate.is_file():
            return candidate
    return DEFAULT_CORPUS_CANDIDATES[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=_default_corpus(), help="tinyshakespeare.txt")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--tokenizer-only", action="store_true", help="stage 1 only (no weights)")
    parser.add_argument("--train-seconds", type=float, default=600.0, help="wall-clock budget of both training phases")
    parser.add_argument("--max-steps", type=int, default=1600, help="optimizer steps of the main model")
    parser.add_argument("--mtp-steps", type=int, default=300, help="optimizer steps of the MTP module")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.corpus.is_file():
        raise SystemExit(f"corpus not found: {args.corpus} (pass --corpus)")
    # Single-threaded BPE training keeps the merge order reproducible. Passive OpenMP waiting (set before torch
    # is imported) keeps torch's two threads from spinning against each other on a busy 2-core machine.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    random.seed(SEED)
    corpus_text = args.corpus.read_text(encoding="utf-8")
    tokenizer = build_tokenizer(corpus_text)
    write_tokenizer_files(tokenizer, args.out)
    _write_json(args.out / "config.json", build_config(tokenizer))
    _write_json(args.out / "generation_config.json", build_generation_config(tokenizer))
    print(f"tokenizer: {tokenizer.get_vocab_size()} tokens -> {args.out}")
    if args.tokenizer_only:
        return
    t0 = time.time()
    train_and_save(tokenizer, corpus_text, args)
    print(f"model written in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
