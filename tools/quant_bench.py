"""Memory and step time of a quantized frozen base (the recipe's ``quantize:``), measured in fresh processes.

    python tools/quant_bench.py 7b --model /work/ckpt/llama2-7b-random            # graftr train, NF4 vs bf16
    python tools/quant_bench.py small                                              # graftr-NF4 vs PEFT + bitsandbytes

``7b``: ``graftr train`` of an InA recipe (rank 8 on q_proj/v_proj, p = 0.3) for ``--steps`` steps of one
64-token sequence, ``train.precision=bf16``, on the 7B-shaped checkpoint, once with ``quantize: {method: nf4}``
and once without (the dense bf16 base). Peak memory is the process's peak resident set (``wait4``'s
``ru_maxrss``: loading, quantizing, every step), step times come from the run's ``metrics.jsonl``.

``small``: a ~100M-parameter Llama-style model with random weights saved to a temporary directory; for IA³ and
LoRA (graftr: InA with p = 0), one training step (forward, loss, backward, AdamW) of graftr on an NF4 base vs
HF PEFT on the same checkpoint loaded by transformers with ``BitsAndBytesConfig(load_in_4bit=True, nf4)``, both
computing in fp32. Each configuration runs in its own process, twice, in the order A B A B (drift cancels across
the pair); per run the median step after two warm-up steps. Memory: the process's peak resident set, and the
step's own memory (tensors autograd saves for backward, deduplicated by storage, plus the trainable parameters,
their gradients and AdamW moments), as tools/bench.py counts it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

INA_7B = """
name: ina_7b
rules:
  - {name: ina, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"}, adapter: {kind: ina, rank: 8, alpha: 16}}
train:
  max_steps: %(steps)d
  micro_batch_size: 1
  lr: 1.0e-3
  log_every: 1
  precision: bf16
  data: {format: text, max_length: 64, eval_split: null}
"""

SMALL = {
    "ia3": ("""
name: ia3
rules:
  - {name: attn, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
  - {name: ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3, scale: input}}
""", "IA3"),
    "lora": ("""
name: lora
rules:
  - {name: lora, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"},
     adapter: {kind: ina, rank: 8, alpha: 16, inhibition: 0.0}}
""", "LORA"),
}


def run_measured(command: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[int, float, str]:
    """Run ``command``; (peak RSS in bytes, wall seconds, output)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{output[-3000:]}")
    return usage.ru_maxrss * 1024, time.perf_counter() - t0, output


# ---- 7b ------------------------------------------------------------------------------------------------------
def bench_7b(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="quant-bench-"))
    (work / "data.jsonl").write_text("".join(json.dumps({"text": " ".join(["the quick brown fox jumps"] * 20)}) + "\n"
                                             for _ in range(8)))
    (work / "ina.yaml").write_text(INA_7B % {"steps": args.steps})
    results = {}
    for method in args.methods:
        out = work / f"run-{method}"
        command = [sys.executable, "-m", "graftr.cli", "train", str(work / "ina.yaml"), "--model", args.model,
                   "--data", str(work / "data.jsonl"), "--out", str(out)]
        if method != "bf16":
            command.append(f"quantize.method={method}")
        peak, wall, output = run_measured(command, env={"PYTHONPATH": str(REPO)})
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["kind"] == "train"]
        steps, tokens = [], 0
        for r in train:
            steps.append((r["tokens"] - tokens) / r["tokens_per_s"])
            tokens = r["tokens"]
        summary = json.loads((out / "adapter" / "manifest.json").read_text())["training"]
        results[method] = {"peak_rss_gib": peak / 2**30, "step_s": steps, "wall_s": wall,
                           "setup_s": summary["elapsed_seconds"] - summary["train_seconds"],
                           "quantized": next((line.strip() for line in output.splitlines()
                                              if line.strip().startswith("quantized ")), None)}
        print(json.dumps({method: results[method]}), flush=True)
    return results


# ---- small ---------------------------------------------------------------------------------------------------
def small_checkpoint(args, directory: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.heads, max_position_embeddings=512, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory)


def child(args) -> None:
    """One configuration in this process: print its JSON line."""
    import torch

    from tools.bench import SavedBytes

    torch.manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    text, peft_type = SMALL[args.method]
    if args.impl == "graftr":
        from transformers import AutoConfig

        from graftr import graft
        from graftr.materialize import build_empty, materialize
        from graftr.recipe import parse_recipe

        recipe = parse_recipe(text + ("quantize: {method: nf4, compute_dtype: float32}\n" if args.quant else ""))
        model = graft(build_empty(AutoConfig.from_pretrained(args.dir), "causal_lm"), recipe)
        materialize(model, args.dir)
    else:
        from peft import IA3Config, LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_compute_dtype=torch.float32) if args.quant else None
        base = AutoModelForCausalLM.from_pretrained(args.dir, quantization_config=quant, device_map="cpu",
                                                    dtype=torch.float32)
        config = (IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                            feedforward_modules=["down_proj"]) if peft_type == "IA3" else
                  LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                             target_modules=["q_proj", "v_proj"]))
        model = get_peft_model(base, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        t0 = time.perf_counter()
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(2):
        step()
    times = [step() for _ in range(args.steps)]
    with SavedBytes() as saved:
        loss = model(**batch).loss
    loss.backward()
    opt.zero_grad(set_to_none=True)
    state = sum(p.numel() * p.element_size() for p in params) * 4
    print(json.dumps({"step_s": statistics.median(times), "step_mib": (saved.total + state) / 2**20,
                      "trainable": sum(p.numel() for p in params)}))


def bench_small(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="quant-small-"))
    small_checkpoint(args, work / "model")
    configs = [(impl, method, quant) for method in SMALL for impl, quant in
               (("graftr", True), ("peft", True), ("graftr", False))]
    runs: dict[tuple, list] = {c: [] for c in configs}
    for _ in range(args.rounds):
        for config in configs:
            impl, method, quant = config
            command = [sys.executable, __file__, "_child", "--impl", impl, "--method", method, "--dir",
                       str(work / "model"), "--seq", str(args.seq), "--batch", str(args.batch), "--vocab",
                       str(args.vocab), "--steps", str(args.steps)] + (["--quant"] if quant else [])
            peak, _, output = run_measured(command, env={"PYTHONPATH": str(REPO)})
            result = json.loads(output.strip().splitlines()[-1])
            runs[config].append({**result, "peak_rss_mib": peak / 2**20})
            print(json.dumps({"config": config, **runs[config][-1]}), flush=True)
    table = {}
    for (impl, method, quant), rs in runs.items():
        table[f"{impl} {method} {'nf4' if quant else 'fp32'}"] = {
            key: statistics.median(r[key] for r in rs) for key in ("step_s", "step_mib", "peak_rss_mib", "trainable")}
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("7b")
    p.add_argument("--model", default="/work/ckpt/llama2-7b-random")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["nf4", "bf16"])
    p = sub.add_parser("small")
    for name, default in (("hidden", 768), ("layers", 12), ("heads", 12), ("intermediate", 2048), ("vocab", 32000),
                          ("seq", 128), ("batch", 4), ("steps", 6), ("rounds", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p = sub.add_parser("_child")
    p.add_argument("--impl", choices=("graftr", "peft"))
    p.add_argument("--method", choices=sorted(SMALL))
    p.add_argument("--quant", action="store_true")
    for name in ("dir", "seq", "batch", "vocab", "steps"):
        p.add_argument(f"--{name}", type=(str if name == "dir" else int))
    args = parser.parse_args()
    if args.what == "_child":
        child(args)
        return 0
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "load_average": os.getloadavg()}
    results = bench_7b(args) if args.what == "7b" else bench_small(args)
    print(json.dumps({"machine": machine, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
