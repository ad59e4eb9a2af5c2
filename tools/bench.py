"""graftr vs HF PEFT vs the frozen base, measured side by side in one process.

    python tools/bench.py                       # ~100M-parameter Llama-style model, batch 4, sequence 128
    python tools/bench.py --hidden 512 --layers 8 --seq 256 --repeats 20 --compile

For each method that both graftr and PEFT have (IA³ ↔ IA3, InA p=0 ↔ LoRA, linear gated prompts ↔
AdaptionPrompt), a training step (forward, loss, backward, AdamW step on the trainable parameters) is timed for
both, **alternating** methods round by round (in a new order each round) so machine drift cancels; times are
medians after warm-up, and a graftr/PEFT ratio is the median over rounds of the two steps' ratio in that round. Every graftr method is also compared with the floor: the frozen base model's forward and
backward with gradients flowing back through every layer (input embeddings require grad), no optimizer.

Memory is the training-step memory that differs between methods: bytes held for backward (tensors saved by
autograd, deduplicated by storage) plus trainable parameters, their gradients and AdamW state. Also reported:
``graftr apply`` wall time for the Llama-2-7B structure on the meta device (cold: a fresh process), and inference
tokens/s of IA³ merged into the weights vs the base. For each graftr/PEFT pair, the share of graftr's step spent in its
matrix products is also profiled: that share times graftr/PEFT is the lowest ratio any fusion or compilation could reach.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # above every level: the profiler's "USDT: profiler_start" lines
import torch  # noqa: E402
from torch import nn  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import graftr  # noqa: E402
from graftr.recipe import parse_recipe  # noqa: E402
from graftr.registry import kinds  # noqa: E402


def llama(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int, vocab: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=max(seq, 512), tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()  # eval: no dropout in either implementation (Llama has none anyway)


@dataclass
class Method:
    name: str  # e.g. "ia3"
    graftr_recipe: str | None
    peft_config: Callable[[], object] | None
    kind: str


def methods(layers: int) -> list[Method]:
    from peft import AdaptionPromptConfig, IA3Config, LoraConfig

    prompt_layers = max(1, layers - 2)
    return [
        Method("ia3", """
name: ia3
rules:
  - {name: attn, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
  - {name: ff, match: {path: "model.layers.*.mlp.down_proj"}, adapter: {kind: ia3, scale: input}}
""", lambda: IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                       feedforward_modules=["down_proj"]), "ia3"),
        Method("ina_p0_vs_lora", """
name: lora
rules:
  - {name: lora, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"},
     adapter: {kind: ina, rank: 8, alpha: 16, inhibition: 0.0}}
""", lambda: LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"]), "ina"),
        Method("ina_p0.3", """
name: ina
rules:
  - {name: ina, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"},
     adapter: {kind: ina, rank: 8, alpha: 16, inhibition: 0.3}}
""", None, "ina"),
        Method("gated_prompt_vs_adaption_prompt", f"""
name: prompts
rules:
  - {{name: prompts, match: {{op: attention, layers: {{last: {prompt_layers}}}}},
     adapter: {{kind: gated_prompt, length: 10, gate: scalar}}}}
""", lambda: AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=10, adapter_layers=prompt_layers), "gated_prompt"),
        Method("gated_prompt_per_head_tanh", f"""
name: prompts
rules:
  - {{name: prompts, match: {{op: attention, layers: {{last: {prompt_layers}}}}},
     adapter: {{kind: gated_prompt, length: 10}}}}
""", None, "gated_prompt"),
    ]


class SavedBytes:
    """Bytes autograd keeps for backward during one forward, counted once per storage."""

    def __init__(self):
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        if isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter):
            s = t.untyped_storage()
            self.storages[s.data_ptr()] = s.nbytes()
        return t

    def __enter__(self):
        self.ctx = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)
        self.ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self.ctx.__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


class Runner:
    """One model under test: its step function and its memory numbers."""

    def __init__(self, label: str, model: nn.Module, batch: dict, optimize: bool):
        self.label, self.model, self.batch = label, model, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4) if optimize and self.params else None
        self.times: list[float] = []

    def step(self) -> float:
        t0 = time.perf_counter()
        loss = self.model(**self.batch).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def memory(self) -> int:
        with SavedBytes() as saved:
            loss = self.model(**self.batch).loss
        loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        state = sum(p.numel() * p.element_size() for p in self.params) * (4 if self.opt is not None else 1)
        return saved.total + state  # params + grads + 2 AdamW moments when trained


# The step's matrix products: the linear layers' (mm/addmm/bmm/baddbmm) and attention's (QKᵀ and PV, inside SDPA's
# fused CPU kernels, forward and backward).
_MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def matmul_share(runner: Runner, repeats: int) -> float:
    """The share of one training step's wall time spent in its matrix products (the kernels in ``_MATMULS``, measured
    in place with ``torch.profiler``; median over ``repeats`` steps).

    Any implementation of the same method computes these products, so this share times the graftr/PEFT ratio is the
    lowest ratio that fusing or compiling everything else could reach. A share, not a time, because it is measured
    after the alternating rounds, where machine drift would not cancel.
    """
    from torch.profiler import ProfilerActivity, profile

    shares = []
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            wall = runner.step()
        shares.append(sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in _MATMULS) / 1e6 / wall)
    return statistics.median(shares)


def paired(a: Runner, b: Runner) -> float:
    """Median over rounds of a's step time over b's in the same round (drift within a run cancels pairwise)."""
    return statistics.median(x / y for x, y in zip(a.times, b.times))


def frozen_base(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    model.enable_input_require_grads()  # gradients flow back through every layer to the embeddings' output
    return model


def apply_time() -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "graftr.cli", "apply", str(REPO / "recipes/ia3_llama.yaml"),
                    "--model", "meta-llama/Llama-2-7b-hf"], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - t0


def tokens_per_second(model: nn.Module, ids: torch.Tensor, repeats: int) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats + 2):
            t0 = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times[2:])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds per method (after 2 warm-up rounds)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--compile", action="store_true",
                    help="also time graftr's graphs compiled as `graftr train` compiles them (train.compile: true)")
    ap.add_argument("--only", nargs="*", help="method names to run (default: all whose kind is registered)")
    ap.add_argument("--skip-apply", action="store_true")
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from peft import get_peft_model

    shape = (args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate, args.vocab, args.seq)
    base = llama(*shape)
    n_params = sum(p.numel() for p in base.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen)
    batch = {"input_ids": ids, "labels": ids}

    runners = [Runner("base (floor)", frozen_base(llama(*shape)), batch, optimize=False)]
    pairs = []  # (method, graftr runner, peft runner | None, compiled runner | None)
    registered = kinds()
    for m in methods(args.layers):
        if m.kind not in registered or (args.only and m.name not in args.only):
            continue
        g = Runner(f"graftr {m.name}", graftr.graft(llama(*shape), parse_recipe(m.graftr_recipe)), batch, True)
        p = Runner(f"peft {m.name}", get_peft_model(llama(*shape), m.peft_config()), batch, True) if m.peft_config else None
        c = None
        if args.compile:
            gm = graftr.graft(llama(*shape), parse_recipe(m.graftr_recipe))
            gm.compile_graph(dynamic=True)  # exactly what `graftr train` does with train.compile: true
            c = Runner(f"graftr {m.name} compiled", gm, batch, True)
        pairs.append((m, g, p, c))
        runners += [r for r in (g, p, c) if r is not None]

    for r in runners:  # warm-up (and compilation)
        for _ in range(2):
            r.step()
    order = random.Random(0)
    for _ in range(args.repeats):  # alternate: every method once per round, in a new order each round, so that
        for r in order.sample(runners, len(runners)):  # no method always runs after the same one
            r.times.append(r.step())
    med = {r.label: statistics.median(r.times) for r in runners}
    mem = {r.label: r.memory() for r in runners}
    mm = {g.label: matmul_share(g, 5) for _, g, p, _ in pairs if p is not None}
    floor = med["base (floor)"]

    rows = []
    for m, g, p, c in pairs:
        row = {"method": m.name, "graftr_ms": 1e3 * med[g.label], "graftr_over_floor": med[g.label] / floor,
               "graftr_mem_mb": mem[g.label] / 2**20,
               "trainable": sum(x.numel() for x in g.params)}
        if p is not None:
            row.update(peft_ms=1e3 * med[p.label], ratio_vs_peft=paired(g, p),
                       peft_mem_mb=mem[p.label] / 2**20, mem_ratio_vs_peft=mem[g.label] / mem[p.label],
                       peft_trainable=sum(x.numel() for x in p.params))
            # the ratio graftr would reach if everything but its matrix products were free
            row.update(matmul_share=mm[g.label], matmul_bound_vs_peft=mm[g.label] * row["ratio_vs_peft"])
        if c is not None:
            row.update(compiled_ms=1e3 * med[c.label], compiled_ratio_vs_peft=paired(c, p) if p else None,
                       compiled_over_floor=med[c.label] / floor)
        rows.append(row)

    # inference: IA³ merged into the weights vs the base
    infer = {}
    if "ia3" in registered:
        merged = graftr.graft(llama(*shape), parse_recipe(methods(args.layers)[0].graftr_recipe)).eval()
        with torch.no_grad():
            for mod in merged.adapter_modules().values():
                mod.ia3_l.uniform_(0.9, 1.1)
        merged.merge_()
        plain = llama(*shape)
        tps_merged, tps_base = [], []
        for _ in range(3):  # alternate
            tps_base.append(tokens_per_second(plain, ids, 3))
            tps_merged.append(tokens_per_second(merged, ids, 3))
        infer = {"base_tok_s": statistics.median(tps_base), "ia3_merged_tok_s": statistics.median(tps_merged)}

    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}, python {platform.python_version()}",
        "model": f"Llama-style, {n_params / 1e6:.0f}M params (hidden {args.hidden}, {args.layers} layers, "
                 f"{args.heads} heads / {args.kv_heads} kv, ffn {args.intermediate}, vocab {args.vocab})",
        "batch": args.batch, "seq": args.seq, "repeats": args.repeats,
        "floor_ms": 1e3 * floor, "floor_mem_mb": mem["base (floor)"] / 2**20,
        "methods": rows, "inference": infer,
        "apply_7b_cold_s": None if args.skip_apply else apply_time(),
    }
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


def print_table(r: dict) -> None:
    print(f"# {r['command']}\n# {r['machine']}\n# {r['model']}, batch {r['batch']}, seq {r['seq']}, "
          f"medians of {r['repeats']} alternating rounds\n")
    print(f"floor (frozen base fwd+bwd): {r['floor_ms']:.1f} ms, {r['floor_mem_mb']:.0f} MB held for backward\n")
    head = ("| method | graftr ms | PEFT ms | graftr/PEFT | graftr/floor | compiled/PEFT | matmuls alone/PEFT | "
            "mem graftr MB | mem PEFT MB | mem ratio | trainable (graftr / PEFT) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))

    def f(v, fmt):
        return "—" if v is None else format(v, fmt)

    for m in r["methods"]:
        print(f"| {m['method']} | {m['graftr_ms']:.1f} | {f(m.get('peft_ms'), '.1f')} | "
              f"{f(m.get('ratio_vs_peft'), '.3f')} | {m['graftr_over_floor']:.3f} | "
              f"{f(m.get('compiled_ratio_vs_peft'), '.3f')} | {f(m.get('matmul_bound_vs_peft'), '.3f')} | "
              f"{m['graftr_mem_mb']:.2f} | {f(m.get('peft_mem_mb'), '.2f')} | {f(m.get('mem_ratio_vs_peft'), '.5f')} | "
              f"{m['trainable']:,} / {f(m.get('peft_trainable'), ',')} |")
    if r["inference"]:
        i = r["inference"]
        print(f"\ninference tokens/s: base {i['base_tok_s']:.0f}, IA³ merged {i['ia3_merged_tok_s']:.0f} "
              f"(ratio {i['ia3_merged_tok_s'] / i['base_tok_s']:.3f})")
    if r["apply_7b_cold_s"] is not None:
        print(f"graftr apply recipes/ia3_llama.yaml on the Llama-2-7B structure (meta, cold process): "
              f"{r['apply_7b_cold_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
