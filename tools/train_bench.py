"""The product path, timed: ``graftr train`` against PEFT + transformers ``Trainer`` and a plain PEFT loop, on the same
model, data, batches, lr, schedule and steps; and graftr's own loop over its graph step.

    python tools/train_bench.py --model smollm2 --json train_bench.json        # the real SmolLM2-135M-Instruct
    python tools/train_bench.py --model random-123m --json train_bench_123m.json   # a random 123M Llama, same tokenizer

For each method (IA³ ↔ PEFT IA3; InA p=0 ↔ PEFT LoRA, r 8, alpha 16, dropout 0.1 on q_proj/k_proj; LLaMA-Adapter's
gated prompts ↔ PEFT AdaptionPrompt, 10 tokens on every layer), four processes run one after another, each in a
fresh Python:

* ``graftr train`` — the command a user runs (its own CLI, DeepSpeed engine, data pipeline, logging, the memory
  policy), the recipe's defaults except: ``max_steps``, constant lr, no evaluation (``eval_split: null``);
* ``trainer`` — ``peft.get_peft_model`` + ``transformers.Trainer`` (AdamW torch, the same lr, constant schedule,
  ``max_grad_norm`` 1, fp32 on the CPU), fed graftr's tokenized examples in graftr's batch order with graftr's
  collator (so every step has the same tokens and padding);
* ``peft loop`` — the same PEFT model in a plain loop: forward with labels, backward, clip, AdamW step;
* ``graph`` — graftr's grafted model alone: forward (fused loss), backward, AdamW step, as ``tools/bench.py`` times
  it, on the same batches.

Step times are per optimizer step (``graftr train``: its metrics.jsonl, ``log_every: 1``; the others: timed around
each step), medians over the steps after the first ``--skip`` (start-up); tokens/s = the non-padding tokens of those
steps over their time. Peak memory is each process's maximum resident set (``ru_maxrss``; model weights, library
code and all). The rounds alternate the four variants (``--rounds``), so drift on a shared machine spreads over
all of them; each figure is the median over its rounds.

    python tools/train_bench.py in-process --method lora --model random-123m

times what graftr train's loop adds inside one process (:func:`in_process`), where process-to-process spread
does not enter.
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
VARIANTS = ("graftr train", "trainer", "peft loop", "graph")

# method -> (graftr recipe and overrides, PEFT config, lr)
METHODS = {
    "ia3": (("recipes/ia3_llama.yaml", []),
            {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": ["k_proj", "v_proj", "down_proj"],
             "feedforward_modules": ["down_proj"]}, 3e-3),
    "lora": (("recipes/ina_llama.yaml", ["rules.0.adapter.inhibition=0"]),
             {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "lora_dropout": 0.1,
              "target_modules": ["q_proj", "k_proj"]}, 5e-4),
    "prompts": (("recipes/llama_adapter.yaml", ["rules.0.match.layers=null"]),  # every layer, as PEFT below
                {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": 10,
                 "adapter_layers": None}, 9e-3 * 8 / 256),
}


def random_model(directory: Path) -> Path:
    """A random 123M Llama (768 wide, 12 layers, 12 heads, MLP 2048, tied embeddings) with SmolLM2's tokenizer."""
    if (directory / "config.json").is_file():
        return directory
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from graftr.models import resolve

    tokenizer = AutoTokenizer.from_pretrained(str(resolve("smollm2").directory))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ---- the workers (each in its own process) ------------------------------------------------------------------------
def _setup(args):
    """graftr's run set-up up to the batches: the model source, the tokenized data, the batch order, the collator."""
    from graftr.console import console
    from graftr.recipe import load_recipe
    from graftr.train import loop
    from graftr.train.config import TrainConfig
    from graftr.train.distributed import init_distributed

    init_distributed()
    recipe_path, overrides = METHODS[args.method][0]
    recipe = load_recipe(REPO / recipe_path, [*overrides, *train_overrides(args)])
    if recipe.train is None:
        recipe.train = TrainConfig()
    run = loop.Run(recipe.train, Path(tempfile.mkdtemp()), 0, 1, lambda *a, **k: None)
    data = loop.setup_data(run, recipe, args.model, args.data)
    return recipe, run, data, console


def _micro_batches(run, data, batches_of, steps: int) -> list[dict]:
    from graftr.train import loop

    batches = batches_of
    it = loop.epoch_batches(data, batches, 0)
    return [next(it) for _ in range(steps)]


def _peft_model(args, data):
    from peft import get_peft_config, get_peft_model

    from graftr.models import load_model

    config = dict(METHODS[args.method][1])
    if config.get("adapter_layers", 0) is None:  # every layer
        config["adapter_layers"] = data.source.config.num_hidden_layers
    model = load_model(data.source, "causal_lm")
    return get_peft_model(model, get_peft_config(config))


def plain_step(model, batch: dict, optimizer, clip: list | None = None) -> None:
    """Forward (the mean loss over the batch's labels), backward, [clip ``clip``'s gradients to norm 1], AdamW step:
    the graph step, and the plain PEFT loop with ``clip``."""
    import torch

    model(**batch, num_items_in_batch=(batch["labels"][:, 1:] != -100).sum()).loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def worker(args) -> dict:
    import torch

    from graftr.train import loop

    torch.manual_seed(0)
    recipe, run, data, _ = _setup(args)
    lr = METHODS[args.method][2]
    if args.variant == "graph":
        model = loop.setup_model(run, recipe, data, torch.device("cpu"))
    else:
        model = _peft_model(args, data)
        model.train()
    batches = loop.setup_batches(run, data, model)
    steps = _micro_batches(run, data, batches, args.steps)
    tokens = [int(b["attention_mask"].sum()) for b in steps]
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    if args.variant == "trainer":
        times = _trainer(model, steps, lr, args)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        clip = params if args.variant == "peft loop" else None
        for batch in steps:
            t0 = time.perf_counter()
            plain_step(model, batch, optimizer, clip)
            times.append(time.perf_counter() - t0)
    return {"step_times": times, "tokens": tokens, "trainable": sum(p.numel() for p in params)}


def in_process(args) -> list[tuple[str, float]]:
    """What graftr train's loop adds, free of process-to-process spread: on one grafted model in one process, the
    graph step alone, the graph step with graftr train's two background threads running (the peak-memory sampler and
    rich's progress bar), alternating, and then graftr train's own step (``loop.accumulate``, the stats all-reduce,
    ``engine.step``, ``check_gradient``) through its DeepSpeed engine, twice. DeepSpeed's gradient hooks stay on the
    model once installed, so its rounds come last. Returns (what, median s/step) per round."""
    import torch
    import torch.distributed as dist

    from graftr.console import console
    from graftr.train import loop
    from graftr.train.memory import PeakMemory
    from graftr.train.metrics import progress_bar

    torch.manual_seed(0)
    recipe, run, data, _ = _setup(args)
    cpu = torch.device("cpu")
    model = loop.setup_model(run, recipe, data, cpu)
    batches = loop.setup_batches(run, data, model)
    steps = _micro_batches(run, data, batches, args.steps)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=METHODS[args.method][2])

    engine = None

    def graftr_step(batch):
        stats = loop.accumulate(engine.engine, iter([batch]), 1, cpu, data.task, 1)
        dist.all_reduce(stats)
        engine.engine.step()
        loop.check_gradient(run, engine.engine, 1, False)

    rounds = []
    for what in ("graph step", "graph step + threads") * 2 + ("graftr train's step",) * 2:
        if what.startswith("graftr") and engine is None:
            engine = loop.setup_engine(run, model, batches)
        threads = None
        if what.endswith("threads"):
            threads = PeakMemory(cpu), progress_bar(console)
            threads[1].start()
            threads[1].add_task("train", total=len(steps), loss="-", lr="-", speed="-")
        times = []
        for batch in steps:
            t0 = time.perf_counter()
            if what.startswith("graftr"):
                graftr_step(batch)
            else:
                plain_step(model, batch, optimizer)
            times.append(time.perf_counter() - t0)
        if threads is not None:
            threads[0].stop()
            threads[1].stop()
        rounds.append((what, statistics.median(times[args.skip:])))
        print(f"{what:22s} {rounds[-1][1]:.3f} s/step", flush=True)
    return rounds


def _trainer(model, steps: list[dict], lr: float, args) -> list[float]:
    """``transformers.Trainer`` over exactly these micro-batches (a dataset of them, batch size 1, an identity
    collator), timed per optimizer step with a callback."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Batches(torch.utils.data.Dataset):
        def __len__(self):
            return len(steps)

        def __getitem__(self, i):
            return steps[i]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.start = [], None

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.start)

    class InOrder(Trainer):  # graftr's batch order, not Trainer's shuffle
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    timer = Timer()
    out = tempfile.mkdtemp()
    training = TrainingArguments(output_dir=out, per_device_train_batch_size=1, max_steps=len(steps),
                                 learning_rate=lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0,
                                 optim="adamw_torch", logging_steps=10, save_strategy="no", eval_strategy="no",
                                 report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True)
    trainer = InOrder(model=model, args=training, train_dataset=Batches(), data_collator=lambda rows: rows[0],
                      callbacks=[timer])
    trainer.train()
    return timer.times


def train_overrides(args) -> list[str]:
    return [f"train.max_steps={args.steps}", "train.lr_schedule=constant", "train.warmup_steps=0",
            "train.data.eval_split=null", "train.log_every=1", f"train.lr={METHODS[args.method][2]}"]


# ---- the driver ---------------------------------------------------------------------------------------------------
def _maxrss(pid: int) -> tuple[int, int]:
    _, status, usage = os.wait4(pid, 0)
    return os.waitstatus_to_exitcode(status), usage.ru_maxrss * 1024


def run_variant(variant: str, method: str, args, model: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if variant == "graftr train":
        out = Path(tempfile.mkdtemp()) / "run"
        recipe_path, overrides = METHODS[method][0]
        command = [sys.executable, "-m", "graftr.cli", "train", str(REPO / recipe_path), "--model", model, "--data",
                   args.data, "--out", str(out), *overrides,
                   *train_overrides(argparse.Namespace(steps=args.steps, method=method))]
    else:
        result = Path(tempfile.mkdtemp()) / "result.json"
        command = [sys.executable, __file__, "worker", "--variant", variant, "--method", method, "--model", model,
                   "--data", args.data, "--steps", str(args.steps), "--result", str(result)]
    log = open(Path(tempfile.mkdtemp()) / "log.txt", "w+")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    code, rss = _maxrss(process.pid)
    if code != 0:
        log.seek(0)
        raise SystemExit(f"{variant} {method} failed ({code}):\n{log.read()[-3000:]}")
    if variant == "graftr train":
        from graftr.train.metrics import read_records

        records, _ = read_records(out / "metrics.jsonl")
        train = [r for r in records if r["kind"] == "train"]
        times = [r["step_s"] for r in train if r.get("step_s")]
        # tokens per step from the running totals (the first record's step has no time of its own)
        tokens = [train[0]["tokens"]] + [b["tokens"] - a["tokens"] for a, b in zip(train, train[1:])]
        manifest = json.loads((out / "adapter" / "manifest.json").read_text())["training"]
        measured = {"step_times": [None] + times, "tokens": tokens, "trainable": manifest["trainable_params"],
                    "graftr_peak": manifest["peak_memory"][0]}
    else:
        measured = json.loads(result.read_text())
    skip = args.skip
    times, tokens = measured["step_times"][skip:], measured["tokens"][skip:]
    return {"variant": variant, "method": method, "step_s": statistics.median(times),
            "tokens_per_s": sum(tokens) / sum(times), "maxrss": rss, "trainable": measured["trainable"],
            "graftr_peak": measured.get("graftr_peak"), "times": measured["step_times"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    w.add_argument("--variant", choices=VARIANTS[1:], required=True)
    w.add_argument("--method", choices=METHODS, required=True)
    w.add_argument("--model", required=True)
    w.add_argument("--data", required=True)
    w.add_argument("--steps", type=int, required=True)
    w.add_argument("--result", required=True)
    i = sub.add_parser("in-process", help="what graftr train's loop adds, measured inside one process")
    i.add_argument("--method", choices=METHODS, default="lora")
    i.add_argument("--model", default="smollm2")
    i.add_argument("--data", default="data/sentiment_instruct")
    i.add_argument("--steps", type=int, default=12)
    i.add_argument("--skip", type=int, default=2)
    ap.add_argument("--model", default="smollm2", help="smollm2 (the real model), random-123m, or a model directory")
    ap.add_argument("--data", default="data/sentiment_instruct")
    ap.add_argument("--methods", default="ia3,lora,prompts")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--skip", type=int, default=3, help="start-up steps left out of the medians")
    ap.add_argument("--rounds", type=int, default=2, help="repetitions of every variant, alternating")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.mode == "worker":
        sys.path.insert(0, str(REPO))
        Path(args.result).write_text(json.dumps(worker(args)))
        return 0
    if args.mode == "in-process":
        sys.path.insert(0, str(REPO))
        if args.model == "random-123m":
            args.model = str(random_model(Path(tempfile.gettempdir()) / "graftr-random-123m"))
        in_process(args)
        return 0
    model = args.model
    if model == "random-123m":
        model = str(random_model(Path(tempfile.gettempdir()) / "graftr-random-123m"))
    methods = [m for m in args.methods.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    results = []
    for round_ in range(args.rounds):
        for method in methods:
            order = variants if round_ % 2 == 0 else variants[::-1]  # alternate the order too
            for variant in order:
                r = run_variant(variant, method, args, model)
                r["round"] = round_
                results.append(r)
                print(f"round {round_} {method:8s} {variant:13s} {r['step_s']:.3f} s/step "
                      f"{r['tokens_per_s']:7.1f} tok/s maxrss {r['maxrss'] / 2**30:.2f} GiB", flush=True)
    table = summarize(results, methods, variants)
    report = {"command": " ".join(["python", "tools/train_bench.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "model": model, "data": args.data,
              "steps": args.steps, "skip": args.skip, "rounds": args.rounds, "rows": table, "runs": results}
    print(markdown(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def summarize(results: list[dict], methods: list[str], variants: list[str]) -> list[dict]:
    rows = []
    for method in methods:
        mine = {v: [r for r in results if r["method"] == method and r["variant"] == v] for v in variants}
        row = {"method": method}
        for v, runs in mine.items():
            if runs:
                row[v] = {"step_s": statistics.median(r["step_s"] for r in runs),
                          "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                          "maxrss": statistics.median(r["maxrss"] for r in runs), "trainable": runs[0]["trainable"],
                          "each_step_s": [round(r["step_s"], 3) for r in runs]}
        rows.append(row)
    return rows


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}` — {report['machine']}, {report['model']}, {report['steps']} steps "
             f"(medians after {report['skip']}), {report['rounds']} alternating rounds", "",
             "| method | variant | s/step (each round) | tokens/s | max RSS | trainable | vs graftr train |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        base = row.get("graftr train", {}).get("tokens_per_s")
        for v in VARIANTS:
            if v not in row:
                continue
            r = row[v]
            ratio = f"{r['tokens_per_s'] / base:.2f}×" if base else "—"
            lines.append(f"| {row['method']} | {v} | {r['step_s']:.3f} ({', '.join(map(str, r['each_step_s']))}) | "
                         f"{r['tokens_per_s']:.0f} | {r['maxrss'] / 2**30:.2f} GiB | {r['trainable']:,} | {ratio} |")
    lines.append("")
    for row in report["rows"]:  # the target: graftr train's step within 5 % of its graph step
        if "graftr train" in row and "graph" in row:
            mine, graph = row["graftr train"]["step_s"], row["graph"]["step_s"]
            lines.append(f"- {row['method']}: graftr train's step over the graph step's: {mine / graph - 1:+.1%} "
                         f"({mine:.3f} against {graph:.3f} s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
