"""Memory held for backward and step time vs sequence length, with and without activation checkpointing, graftr
beside HF PEFT + transformers' ``gradient_checkpointing_enable()`` (issue 15).

    python tools/seq_bench.py                                    # Llama-style, hidden 256, 4 layers, 32k vocab
    python tools/seq_bench.py --seqs 256 512 1024 2048 4096 --hidden 512 --layers 8 --json seq.json

The method is the same on both sides: InA with p=0 (LoRA) of rank 8 on q_proj and v_proj ↔ PEFT ``LoraConfig``.
Variants, each on the same base weights, batch 1:

``graftr``, ``graftr+ckpt``
    ``graftr.graft`` of the LoRA recipe; ``+ckpt``: ``GraftedModel.gradient_checkpointing_enable()`` (each decoder
    layer recomputed in backward; graftr.checkpointing, non-reentrant).
``peft``, ``peft+ckpt``
    ``peft.get_peft_model`` of the HF model; ``+ckpt``: ``model.gradient_checkpointing_enable(
    gradient_checkpointing_kwargs={"use_reentrant": False})``, what HF Trainer does with ``gradient_checkpointing``.
``floor`` (graftr's loss path), ``floor-hf`` (transformers' loss path), each also ``+ckpt``
    The frozen base with gradients flowing back through every layer and nothing trained that costs memory: graftr:
    IA³ input scaling on layer 0's q_proj only (its gradient needs every layer's backward); HF: the frozen model
    with ``enable_input_require_grads()``. graftr's language-model loss never keeps the logits (graftr.loss), HF's
    keeps an fp32 log-softmax of (tokens × vocab), so each side is compared with the floor of its own loss path.

Held for backward: the bytes a training forward allocates and still holds when backward starts (torch.profiler's
CPU memory events, net over the forward, after a warm-up step), the same measure for every variant; graftr's fused
loss also keeps one logits chunk between steps (``graftr.loss.Scratch``, at most 128 MiB), allocated in the warm-up
and reported by ``graftr estimate`` as "loss workspace". Step time: forward, backward, AdamW
step; median of ``--repeats`` steps after one warm-up, variants alternating within each round so drift cancels.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' gradient_checkpointing_* renames
os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # above every level: the profiler's "USDT: profiler_start" lines
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

LORA = """
name: lora
rules:
  - {name: lora, match: {path: "model.layers.*.self_attn.{q_proj,v_proj}"},
     adapter: {kind: ina, rank: 8, alpha: 16, inhibition: 0.0}}
"""
FLOOR = """
name: floor
rules:
  - {name: first, match: {path: "model.layers.0.self_attn.q_proj"}, adapter: {kind: ia3, scale: input}}
"""


def base_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=max(args.seqs),
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def variants(base) -> dict:
    """name -> the model under test (each a copy of ``base``'s weights, in train mode)."""
    from peft import LoraConfig, get_peft_model

    import graftr
    from graftr.recipe import parse_recipe

    out = {}
    for ckpt in (False, True):
        gm = graftr.graft(copy.deepcopy(base), parse_recipe(LORA))
        if ckpt:
            gm.gradient_checkpointing_enable()
        out["graftr+ckpt" if ckpt else "graftr"] = gm.train()
        peft = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                              lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
        if ckpt:
            peft.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out["peft+ckpt" if ckpt else "peft"] = peft.train()
    for ckpt in (False, True):
        floor = graftr.graft(copy.deepcopy(base), parse_recipe(FLOOR))
        hf = copy.deepcopy(base)
        for p in hf.parameters():
            p.requires_grad_(False)
        hf.enable_input_require_grads()
        if ckpt:
            floor.gradient_checkpointing_enable()
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out["floor+ckpt" if ckpt else "floor"] = floor.train()
        out["floor-hf+ckpt" if ckpt else "floor-hf"] = hf.train()
    return out


class Step:
    def __init__(self, model, ids):
        self.model, self.ids = model, ids
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.times: list[float] = []

    def __call__(self) -> float:
        t0 = time.perf_counter()
        self.model(input_ids=self.ids, labels=self.ids).loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    def held_for_backward(self) -> int:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            loss = self.model(input_ids=self.ids, labels=self.ids).loss
        held = sum(e.self_cpu_memory_usage for e in prof.events())
        loss.backward()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        return held


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--seqs", type=int, nargs="+", default=[256, 512, 1024, 2048])
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", help="also write the results as JSON to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = base_model(args)
    models = variants(base)
    rows = []
    for seq in args.seqs:
        ids = torch.randint(3, args.vocab, (1, seq), generator=torch.Generator().manual_seed(seq))
        steps = {name: Step(model, ids) for name, model in models.items()}
        for step in steps.values():
            step()  # warm-up; graftr's loss allocates its logits buffer here, kept between steps, not counted below
        held = {name: step.held_for_backward() for name, step in steps.items()}
        order = list(steps)
        for r in range(args.repeats):
            random.Random(r).shuffle(order)
            for name in order:
                steps[name].times.append(steps[name]())
        row = {"seq": seq, **{f"{n}_held_mib": held[n] / 2**20 for n in steps},
               **{f"{n}_step_s": statistics.median(s.times) for n, s in steps.items()}}
        rows.append(row)
        print(f"seq {seq:>5}: " + "  ".join(f"{n} {held[n] / 2**20:7.1f} MiB {statistics.median(s.times):6.3f} s"
                                            for n, s in steps.items()), flush=True)
    print()
    names = list(models)
    print("| seq | " + " | ".join(f"{n} held (MiB)" for n in names) + " | graftr over floor | peft over floor-hf |"
          " graftr+ckpt over floor+ckpt | peft+ckpt over floor-hf+ckpt |")
    print("|---" * (len(names) + 5) + "|")
    for row in rows:
        over = [row["graftr_held_mib"] - row["floor_held_mib"], row["peft_held_mib"] - row["floor-hf_held_mib"],
                row["graftr+ckpt_held_mib"] - row["floor+ckpt_held_mib"],
                row["peft+ckpt_held_mib"] - row["floor-hf+ckpt_held_mib"]]
        print(f"| {row['seq']} | " + " | ".join(f"{row[f'{n}_held_mib']:.1f}" for n in names) + " | "
              + " | ".join(f"{v:.1f}" for v in over) + " |")
    print()
    print("| seq | " + " | ".join(f"{n} step (s)" for n in names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for row in rows:
        print(f"| {row['seq']} | " + " | ".join(f"{row[f'{n}_step_s']:.3f}" for n in names) + " |")
    if args.json:
        meta = {"args": vars(args), "torch": torch.__version__, "machine": platform.processor() or platform.machine()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
