"""Adapters on Mixture-of-Experts experts: graftr's activation-space products against PEFT's ``target_parameters``.

    python tools/moe_bench.py                  # Qwen3-MoE-shaped: 4 layers, hidden 512, 8 experts × 512, top-2
    python tools/moe_bench.py --experts 32 --top-k 4 --rounds 7 --json moe.json
    python tools/moe_bench.py --device cuda --dtype bfloat16 --experts 64 --top-k 8 --batch 8 --seq 512   # a GPU

A training step (forward, loss, backward, AdamW step on the trainable parameters) of a random Qwen3-MoE model is
timed for each variant, **alternating** variants round by round (in a new order each round) so machine drift
cancels; times are medians over rounds. Variants:

* ``floor``: the frozen HF base (transformers' own ``grouped_mm`` experts), forward and backward with gradients
  flowing back through every layer (the input embeddings require grad), no optimizer, as ``tools/bench.py``;
* ``graftr <kind>``: one rule on every expert site (``op: experts``) — LoRA r=8 (InA p=0), InA p=0.3, IA³ on the
  experts' intermediate activation (``scale: input`` on down_proj), scale_bias;
* ``PEFT LoRA``: ``LoraConfig(r=8, target_parameters=[mlp.experts.gate_up_proj, mlp.experts.down_proj])`` on the
  HF model (transformers' own ``grouped_mm`` experts), which adds the full E × out × in weight delta of each expert
  weight on every forward.

Memory is what differs between variants in a training step: bytes held for backward (tensors saved by autograd,
deduplicated by storage, the base's own weights excluded) plus trainable parameters, their gradients and AdamW's two
moments. Each variant's logits at init are checked against the frozen base (identity at init) before timing.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from graftr import graft  # noqa: E402
from graftr.recipe import parse_recipe  # noqa: E402

KINDS = {
    "graftr LoRA": "{kind: ina, rank: 8, alpha: 16, inhibition: 0}",
    "graftr InA p=0.3": "{kind: ina, rank: 8, alpha: 16, inhibition: 0.3}",
    "graftr IA³": "{kind: ia3, scale: input}",
    "graftr scale_bias": "{kind: scale_bias}",
}


def model(args):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 2,
        moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4, head_dim=args.hidden // 8,
        max_position_embeddings=max(512, args.seq), decoder_sparse_step=1, mlp_only_layers=[])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(device=args.device, dtype=getattr(torch, args.dtype)).eval()


class Saved:
    """Bytes autograd saves for backward, per storage, the model's own tensors excluded."""

    def __init__(self, module):
        self.excluded = {t.untyped_storage()._cdata for t in [*module.parameters(), *module.buffers()]}
        self.bytes: dict[int, int] = {}

    def pack(self, t):
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s._cdata not in self.excluded:
                self.bytes[s._cdata] = s.nbytes()
        return t


def build(name: str, args):
    """(module, optimizer or None, trainable params, input kwargs)."""
    base = model(args)
    if name == "PEFT LoRA":
        import peft

        config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=[],
                                 target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        module = peft.get_peft_model(base, config)
    elif name == "floor":
        module = base
        for p in module.parameters():
            p.requires_grad_(False)
        module.enable_input_require_grads()  # gradients flow back through every layer to the embeddings' output
    else:
        module = graft(base, parse_recipe(f"name: b\nrules:\n  - name: x\n    match: {{op: experts}}\n"
                                          f"    adapter: {KINDS[name]}\n"))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    return module, opt, params


def step(module, opt, ids, floor: bool):
    loss = module(input_ids=ids, labels=ids).loss
    if floor:
        loss.backward()
        return loss.item()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def measure(args) -> dict:
    names = ["floor", *KINDS, "PEFT LoRA"]
    ids = torch.randint(3, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tolerance = 1e-4 if args.dtype == "float32" else 5e-2
    built = {n: build(n, args) for n in names}
    with torch.no_grad():
        reference = built["floor"][0].eval()(input_ids=ids).logits
        for n, (module, _, _) in built.items():
            diff = (module.eval()(input_ids=ids).logits - reference).abs().max().item()
            assert diff < tolerance, f"{n} is not the base at init ({diff})"
            module.train()
    memory = {}
    for n, (module, opt, params) in built.items():
        saved = Saved(module)
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            step(module, opt, ids, n == "floor")
        states = sum(p.numel() * p.element_size() * (4 if opt else 0) for p in params)  # p, grad, 2 moments
        memory[n] = {"saved_mib": sum(saved.bytes.values()) / 2**20, "states_mib": states / 2**20,
                     "trainable": sum(p.numel() for p in params)}
    times: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(args.warmup):
        for n, (module, opt, _) in built.items():
            step(module, opt, ids, n == "floor")
    for _ in range(args.rounds):
        order = names[:]
        rng.shuffle(order)
        for n in order:
            module, opt, _ = built[n]
            sync()
            t0 = time.perf_counter()
            step(module, opt, ids, n == "floor")
            sync()
            times[n].append(time.perf_counter() - t0)
    machine = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else (platform.processor()
                                                                                  or platform.machine())
    result = {"config": vars(args), "torch": torch.__version__, "machine": machine,
              "threads": torch.get_num_threads(), "variants": {}}
    floor = statistics.median(times["floor"])
    for n in names:
        med = statistics.median(times[n])
        result["variants"][n] = {"step_s": med, "min_s": min(times[n]), "max_s": max(times[n]),
                                 "over_floor": med / floor, **memory[n]}
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=512, help="each expert's intermediate size")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    result = measure(args)
    print(f"{args.layers} layers, hidden {args.hidden}, {args.experts} experts × {args.intermediate}, top-{args.top_k}, "
          f"batch {args.batch} × {args.seq} tokens, {args.dtype} on {result['machine']}, {result['threads']} threads, "
          f"{args.rounds} alternating rounds")
    print(f"{'variant':<20} {'step s':>8} {'min-max':>13} {'× floor':>8} {'saved MiB':>10} {'states MiB':>10} "
          f"{'trainable':>11}")
    for n, v in result["variants"].items():
        print(f"{n:<20} {v['step_s']:8.3f} {v['min_s']:6.3f}-{v['max_s']:.3f} {v['over_floor']:8.2f} "
              f"{v['saved_mib']:10.1f} {v['states_mib']:10.1f} {v['trainable']:11,}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
