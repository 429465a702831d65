"""`bench offline --json-schema-fraction`: the constrained batch generates the same number of tokens as the
unconstrained one (the schema cannot end first), and the figures are reported."""

import json

from nextserve.cli import main


def test_bench_offline_json_schema_fraction(tmp_path):
    out = tmp_path / "guided.json"
    argv = ["bench", "offline", "--device", "cpu", "--num-prompts", "4", "--input-len", "6", "--output-len", "12"]
    argv += ["--json-schema-fraction", "0.5", "--repeats", "2", "--cpu-cache-bytes", str(16 << 20)]
    assert main(argv + ["--output-json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["num_constrained"] == 2 and result["same_token_counts"]
    assert len(result["plain_tok_s"]) == len(result["guided_tok_s"]) == 2 and result["median_ratio"] > 0
