"""The built-in tiny model: tokenizer round-trips, special-token ids, chat template, checkpoint layout, loading."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from nextserve.assets import DEFAULT_MODEL_DIR, default_model_path

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "make_tiny_model.py"

# Qwen's added tokens in id order (spec section 13) and whether each is "special".
QWEN_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]  # fmt: skip

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def config() -> dict:
    return json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())


def _render(tokenizer, messages, **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def _load_script():
    spec = importlib.util.spec_from_file_location("make_tiny_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- files and paths -----------------------------------------------------------------------------------------


def test_default_model_dir_holds_a_model_folder():
    assert default_model_path() == str(DEFAULT_MODEL_DIR)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "model.safetensors", "README.md"):  # fmt: skip
        assert (DEFAULT_MODEL_DIR / name).is_file(), name
    assert (DEFAULT_MODEL_DIR / "model.safetensors").stat().st_size < 6 * 1024 * 1024


def test_shipped_template_is_the_scripts_template():
    script = _load_script()
    shipped = json.loads((DEFAULT_MODEL_DIR / "tokenizer_config.json").read_text())["chat_template"]
    assert shipped == script.CHAT_TEMPLATE
    assert (DEFAULT_MODEL_DIR / "chat_template.jinja").read_text() == script.CHAT_TEMPLATE


# ---- tokenizer -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "ROMEO:\nBut soft, what light through yonder window breaks?\n\n",
        "  leading spaces,\ttabs\t and trailing   \n\n\n",
        "Größe, naïve café, Ελληνικά, русский, 日本語のテキスト, 🤖🎭 e\u0301 (decomposed) \u200b",
        "",
    ],
)
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    if text.isascii() and text:
        # Learned merges are in use: fewer ids than bytes.
        assert len(ids) < len(text.encode())


def test_added_tokens_follow_qwen_order_and_specialness(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(content) for content, _ in QWEN_ADDED]
    assert ids == list(range(ids[0], ids[0] + len(QWEN_ADDED)))
    assert len(tokenizer) == ids[-1] + 1
    special = set(tokenizer.all_special_tokens)
    for content, is_special in QWEN_ADDED:
        assert tokenizer.encode(content, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(content)]
        assert (content in special) == is_special, content
    # skip_special_tokens strips ChatML markers but keeps <think>/<tool_call> text, as Qwen's tokenizer does.
    ids = tokenizer.encode("<|im_start|>hi<think>x</think><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi<think>x</think>"


def test_special_token_ids_agree_with_configs(tokenizer, config):
    generation = json.loads((DEFAULT_MODEL_DIR / "generation_config.json").read_text())
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == im_end and tokenizer.pad_token_id == endoftext
    assert tokenizer.bos_token is None
    assert tokenizer.encode("hi")[0] != endoftext  # no BOS added
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (endoftext, im_end, endoftext)
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.7, 0.8, 20)
    assert config["vocab_size"] % 64 == 0 and len(tokenizer) <= config["vocab_size"] < len(tokenizer) + 64
    assert tokenizer.model_max_length == config["max_position_embeddings"]


@pytest.mark.skipif(not _load_script()._default_corpus().is_file(), reason="tinyshakespeare corpus not present")
def test_tokenizer_is_reproducible_from_the_corpus():
    script = _load_script()
    rebuilt = script.build_tokenizer(script._default_corpus().read_text(encoding="utf-8"))
    shipped = json.loads((DEFAULT_MODEL_DIR / "tokenizer.json").read_text())
    assert json.loads(rebuilt.to_str())["model"]["merges"] == shipped["model"]["merges"]


# ---- chat template -------------------------------------------------------------------------------------------


def test_plain_chat_is_chatml(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Good morrow."},
        {"role": "user", "content": [{"type": "text", "text": "Again"}]},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nGood morrow.<|im_end|>\n<|im_start|>user\nAgain<|im_end|>\n"
    )
    assert _render(tokenizer, messages) == expected
    assert _render(tokenizer, messages, add_generation_prompt=True) == expected + "<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no BOS in front


def test_enable_thinking_opens_a_think_block_only_when_asked(tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    base = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert _render(tokenizer, messages, add_generation_prompt=True) == base
    assert _render(tokenizer, messages, add_generation_prompt=True, enable_thinking=False) == base
    assert _render(tokenizer, messages, add_generation_prompt=True, enable_thinking=True) == base + "<think>\n"


def test_tools_make_a_system_turn_with_one_json_line_per_tool(tokenizer):
    other = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
    for messages, system_text in (
        ([{"role": "user", "content": "Weather?"}], None),
        ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}], "Be brief."),
    ):
        text = _render(tokenizer, messages, tools=[WEATHER_TOOL, other], add_generation_prompt=True)
        system, rest = text.split("<|im_end|>\n", 1)
        assert system.startswith("<|im_start|>system\n" + (system_text + "\n\n" if system_text else "# Tools"))
        assert "# Tools\n\n" in system
        block = re.search(r"<tools>\n(.*)\n</tools>", system, re.S)
        assert [json.loads(line) for line in block.group(1).split("\n")] == [WEATHER_TOOL, other]
        assert '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>' in system
        assert rest == "<|im_start|>user\nWeather?<|im_end|>\n<|im_start|>assistant\n"
        assert system.count("<|im_start|>") == 1


def test_tool_calls_and_merged_tool_responses(tokenizer):
    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Verona"}}},
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Mantua"}'}},
    ]
    messages = [
        {"role": "user", "content": "Weather in Verona and Mantua?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "Sun, then rain."},
    ]
    text = _render(tokenizer, messages, tools=[WEATHER_TOOL])
    turns = text.split("<|im_end|>\n")[1:]
    assert turns[1] == (
        "<|im_start|>assistant\nLet me look.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Mantua"}}\n</tool_call>'
    )
    assert turns[2] == (
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>"
    )
    assert turns[3] == "<|im_start|>assistant\nSun, then rain."
    # Without content, no newline precedes the first call.
    messages[1]["content"] = ""
    text = _render(tokenizer, messages[:2])
    assert '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Verona"}}' in text


def test_reasoning_is_kept_only_after_the_last_user_query(tokenizer):
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Verona"}}}
    messages = [
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nFirst answer"},
        {"role": "user", "content": "Second question"},
        {"role": "assistant", "content": "", "reasoning_content": "need the weather", "tool_calls": [call]},
        {"role": "tool", "content": "sunny"},
    ]
    text = _render(tokenizer, messages, add_generation_prompt=True)
    assert "old thoughts" not in text and "<|im_start|>assistant\nFirst answer<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\nneed the weather\n</think>\n\n<tool_call>\n" in text
    assert text.endswith("<tool_response>\nsunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


# ---- checkpoint ----------------------------------------------------------------------------------------------


def test_checkpoint_uses_per_expert_names_and_has_mtp(config):
    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    assert dtypes == {"BF16"}
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)
    for prefix in [f"model.layers.{i}." for i in range(config["num_hidden_layers"])] + ["mtp.layers.0."]:
        for e in range(config["num_experts"]):
            assert shapes[f"{prefix}mlp.experts.{e}.gate_proj.weight"] == (inter, hidden)
            assert shapes[f"{prefix}mlp.experts.{e}.up_proj.weight"] == (inter, hidden)
            assert shapes[f"{prefix}mlp.experts.{e}.down_proj.weight"] == (hidden, inter)
    assert shapes["mtp.fc.weight"] == (hidden, 2 * hidden)
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        assert shapes[f"mtp.{norm}.weight"] == (hidden,)
    # The MTP layer is a full-attention layer with the same tensors as the main model's layer 3.
    layer3 = {n.removeprefix("model.layers.3.") for n in names if n.startswith("model.layers.3.")}
    assert {n.removeprefix("mtp.layers.0.") for n in names if n.startswith("mtp.layers.0.")} == layer3
    assert "self_attn.q_proj.weight" in layer3 and config["num_nextn_predict_layers"] == 1


def test_transformers_loads_the_checkpoint_and_continues_romeo(tokenizer):
    from transformers import Qwen3NextForCausalLM

    model, info = Qwen3NextForCausalLM.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert not [k for k in info["unexpected_keys"] if not k.startswith("mtp.")]
    assert model.config.layer_types == ["linear_attention"] * 3 + ["full_attention"]
    prompt = torch.tensor([tokenizer.encode("ROMEO:")])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=None)
    new = out[0, prompt.shape[1] :].tolist()
    assert len(set(new)) > 4, tokenizer.decode(new)
    assert not set(new) & {tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN_ADDED}
