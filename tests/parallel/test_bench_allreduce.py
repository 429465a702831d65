"""`nextserve bench allreduce` on CPU: two gloo processes, every size timed and its sum checked."""

import json

import pytest

from nextserve.bench import allreduce


def test_two_gloo_ranks_time_every_size(tmp_path, capsys):
    out = tmp_path / "rows.json"
    argv = ["--device", "cpu", "--sizes", "4k,64k,1m", "--iters", "3", "--warmup", "1", "--output-json", str(out)]
    assert allreduce.main(argv) == 0
    rows = json.loads(out.read_text())
    assert [(r["backend"], r["bytes"]) for r in rows] == [("dist/gloo", n) for n in (4096, 65536, 1 << 20)]
    assert all(r["ok"] and r["latency_us"] > 0 and r["tp_size"] == 2 for r in rows)
    assert "dist/gloo      4096" in capsys.readouterr().out


def test_defaults_span_4k_to_1m_and_bad_flags_are_errors():
    assert allreduce.DEFAULT_SIZES[0] == 4096 and allreduce.DEFAULT_SIZES[-1] == 1 << 20
    with pytest.raises(SystemExit):
        allreduce.main(["--sizes", "4q"])
    with pytest.raises(ValueError, match="--tp-size must be >= 2"):
        allreduce.main(["--tp-size", "1", "--device", "cpu"])
