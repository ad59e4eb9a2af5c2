"""tools/bench.py runs end to end on a tiny model and reports every pair it promises (timings are not asserted:
speed targets are checked by running the benchmark, see docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("peft")
REPO = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_reports_every_method(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "tools/bench.py"), "--hidden", "64", "--layers", "3", "--heads", "4",
           "--kv-heads", "2", "--intermediate", "128", "--vocab", "256", "--batch", "2", "--seq", "16",
           "--repeats", "1", "--skip-apply", "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = {m["method"]: m for m in result["methods"]}
    assert set(rows) == {"ia3", "ina_p0_vs_lora", "ina_p0.3", "gated_prompt_vs_adaption_prompt",
                         "gated_prompt_per_head_tanh"}
    for name in ("ia3", "ina_p0_vs_lora", "gated_prompt_vs_adaption_prompt"):
        row = rows[name]
        assert row["trainable"] == row["peft_trainable"]  # the same method, the same parameters
        assert 0 < row["matmul_bound_vs_peft"] and row["ratio_vs_peft"] > 0 and row["mem_ratio_vs_peft"] > 0
    assert result["inference"]["base_tok_s"] > 0 and result["apply_7b_cold_s"] is None
    assert "| ia3 |" in run.stdout


def test_moe_bench_smoke_run_reports_every_variant(tmp_path):
    out = tmp_path / "moe.json"
    cmd = [sys.executable, str(REPO / "tools/moe_bench.py"), "--layers", "1", "--hidden", "64", "--intermediate",
           "32", "--experts", "4", "--vocab", "256", "--batch", "2", "--seq", "16", "--rounds", "1", "--warmup", "0",
           "--json", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    variants = json.loads(out.read_text())["variants"]
    assert list(variants) == ["floor", "graftr LoRA", "graftr InA p=0.3", "graftr IA³", "graftr scale_bias",
                              "PEFT LoRA"]
    assert variants["graftr LoRA"]["trainable"] == variants["PEFT LoRA"]["trainable"] == 1 * 4 * 8 * (64 + 64 + 32 + 64)
    assert variants["floor"]["trainable"] == 0 and all(v["step_s"] > 0 for v in variants.values())
