"""The command line: plans, inspection, validation, schema, and one-line errors with exit status 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from zoo import tiny_config

from graftr.cli import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def llama_config(tmp_path):
    path = tmp_path / "tiny-llama"
    tiny_config("llama").save_pretrained(path)
    return path / "config.json"


def test_apply_prints_the_plan_and_saves(llama_config, tmp_path, capsys):
    assert main(["apply", "recipes/ia3_llama.yaml", "--model", str(llama_config), "--out", str(tmp_path / "a")]) == 0
    text = capsys.readouterr().out
    assert "ia3_attn" in text and "ia3_ff" in text and "model.layers.0.self_attn.k_proj" in text
    assert "trainable params: 192 /" in text  # 4 k/v sites × 32 + 2 down_proj sites × 64 inputs
    assert (tmp_path / "a" / "adapter.safetensors").is_file()


def test_apply_dry_run_matches_only(llama_config, capsys):
    assert main(["apply", "recipes/ia3_llama.yaml", "--model", str(llama_config), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "dry run" in text and "trainable params" not in text


def test_inspect_lists_sites(llama_config, capsys):
    assert main(["inspect", "--model", str(llama_config), "--filter", "model.layers.1.**", "--op", "linear"]) == 0
    text = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in text and "64 → 32" in text and "7 sites" in text


def test_validate_and_schema(tmp_path, capsys):
    assert main(["validate", "recipes/ia3_llama.yaml"]) == 0
    assert main(["schema", "--out", str(tmp_path / "schema.json")]) == 0
    schema = json.loads((tmp_path / "schema.json").read_text())
    assert "ia3" in json.dumps(schema)


@pytest.mark.parametrize("argv,message", [
    (["apply", "missing.yaml", "--model", "x"], "recipe not found: missing.yaml"),
    (["apply", "recipes/ia3_llama.yaml", "--model", "nobody/no-such-model"], "nobody/no-such-model"),
    (["inspect", "--model", "meta-llama/Llama-2-7b-hf", "--filter", "model.{a"], "--filter: bad glob"),
])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_recipe_reports_every_problem(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nrules:\n  - name: r\n    match: {path: 'a.{b'}\n    adapter: {kind: ia3, scal: input}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: rules[0].match.path: bad glob" in err and f"{bad}:5: rules[0].adapter" in err


def test_console_script_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "graftr.cli", "validate", "recipes/ia3_t5.yaml"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_apply_on_the_llama2_7b_structure_uses_no_weight_memory(capsys):
    """The mission's own command shape on the bundled 7B snapshot: meta device, PEFT's IA³ count."""
    assert main(["apply", "recipes/ia3_llama.yaml", "--model", "meta-llama/Llama-2-7b-hf"]) == 0
    text = capsys.readouterr().out
    assert "bundled config snapshot" in text
    assert "trainable params: 614,400 / total: 6,739,030,016" in text


def test_the_mission_command_on_a_fresh_offline_machine(tmp_path):
    """`graftr apply recipes/ina_llama.yaml --model meta-llama/Llama-2-7b-hf` with an empty HF cache and no network:
    the bundled snapshot, 64 sites (q_proj, k_proj × 32 layers) and 32·2·8·(4096+4096) trainable parameters."""
    env = {**os.environ, "HF_HOME": str(tmp_path / "empty-hf-home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    run = ("import resource, sys; from graftr.cli import main; code = main(sys.argv[1:]); "
           "print('peak RSS KiB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")
    proc = subprocess.run([sys.executable, "-c", run, "apply", "recipes/ina_llama.yaml", "--model",
                           "meta-llama/Llama-2-7b-hf"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "bundled config snapshot" in proc.stdout
    # no weight memory: 6.7 B parameters would take 13.5 GB even in fp16; the whole process stays under 2 GB
    assert int(proc.stdout.rsplit("peak RSS KiB", 1)[1]) < 2 * 1024 * 1024
    row = next(line for line in proc.stdout.splitlines() if "ina_qk" in line)
    assert [cell.strip() for cell in row.split("│")[1:5]] == ["ina_qk", "ina", "64", "4,194,304"]
    assert "trainable params: 4,194,304 / total: 6,742,609,920" in proc.stdout


def test_piped_output_keeps_whole_paths(llama_config):
    """`graftr inspect ... | grep k_proj` works: output that is not a terminal is not cut at 80 columns."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.run([sys.executable, "-m", "graftr.cli", "inspect", "--model", str(llama_config), "--filter",
                           "model.layers.1.**"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    paths = {line.split("│")[1].strip() for line in proc.stdout.splitlines() if line.startswith("│")}
    assert {f"model.layers.1.self_attn.{p}_proj" for p in "qkvo"} | {f"model.layers.1.mlp.{p}_proj" for p in (
        "gate", "up", "down")} <= paths
