"""Greedy decoding of a deployed adapter: the exported programs, their AOTInductor build, graftr's own loop and HF
``generate``; and a mixed batch of several adapters against one run per adapter.

    python tools/deploy_bench.py --model smollm2 --adapter runs/smollm2/adapter --json deploy_bench.json

What it does:

1. ``graftr deploy ADAPTER --compile`` (timed: export and AOTInductor compilation) into ``--work``/single, and
   ``--bank`` copies of the adapter with perturbed tensors (seeded; throughput does not depend on their values)
   deployed together as one bank into ``--work``/bank.
2. For each batch size (``--batch``), left-padded prompts from data/sentiment_instruct's validation split, wrapped in
   the adapter's training template, ``--new`` greedy tokens each (EOS ignored, so every variant makes the same
   number of tokens):

   * ``exported`` — ``graftr_runtime`` on prefill.pt2/decode.pt2 (torch.export programs, eager);
   * ``aoti`` — the same steps compiled by AOTInductor (prefill.aoti.pt2/decode.aoti.pt2);
   * ``graftr`` — ``graftr.generate.generate_ids`` on the grafted model (graftr's KV cache, what ``graftr generate``
     runs);
   * ``hf`` — ``transformers`` ``generate`` on the merged model when the adapter merges, else on the base model
     alone (the adapter then does not run: a floor, not a like-for-like comparison), ``use_cache=True``.

   Each variant: one warm-up run, then the median of ``--repeats`` runs; tokens/s = batch × new tokens / time.
3. The bank: one batch in which the rows use different adapters (``--bank`` adapters, the batch split evenly) against
   the same rows run adapter by adapter through the single-adapter artifact, its tensors swapped in between
   (``Deployed.replace``, not timed). The tokens of the two are compared row by row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def deploy(adapters: list[Path], model: str, out: Path, extra: list[str]) -> float:
    if (out / "deploy.json").is_file():
        return float("nan")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "graftr.cli", "deploy", *map(str, adapters), "--model", model, "--out", str(out),
                    *extra], check=True, cwd=REPO)
    return time.perf_counter() - start


def perturbed_copies(adapter: Path, work: Path, count: int) -> list[Path]:
    from safetensors.torch import load_file, save_file

    tensors = load_file(adapter / "adapter.safetensors")
    copies = []
    for i in range(count):
        target = work / f"adapter{i}"
        if not target.exists():
            shutil.copytree(adapter, target)
            gen = torch.Generator().manual_seed(i)
            save_file({k: v + 0.05 * i * torch.randn(v.shape, generator=gen).to(v.dtype) for k, v in tensors.items()},
                      target / "adapter.safetensors")
        copies.append(target)
    return copies


def prompts(runtime_model, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [json.loads(line) for line in (REPO / "data/sentiment_instruct/validation.jsonl").read_text().splitlines()]
    return runtime_model.encode([r["messages"][0]["content"] for r in rows[:count]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--adapter", required=True, type=Path)
    parser.add_argument("--work", type=Path, default=Path("/tmp/graftr-deploy-bench"))
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bank", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(REPO))

    limits = ["--max-batch", str(max(args.batch)), "--max-length", "256"]
    seconds = {"single (export + compile)": deploy([args.adapter], args.model, args.work / "single",
                                                    [*limits, "--compile"]),
               "bank (export)": deploy(perturbed_copies(args.adapter, args.work, args.bank), args.model,
                                       args.work / "bank", limits)}
    sys.path.insert(0, str(args.work / "single"))
    import graftr_runtime

    from graftr.generate import generate_ids
    from graftr.load import load_adapters
    from graftr.merge import merge_into_hf, merge_refusal

    exported = graftr_runtime.load(args.work / "single")
    compiled = graftr_runtime.load(args.work / "single", compiled=True)
    loaded, _ = load_adapters(args.model, [str(args.adapter)])
    gm = loaded.gm.eval()
    if merge_refusal(gm) is None:
        hf_model, hf_what = merge_into_hf(load_adapters(args.model, [str(args.adapter)])[0]).eval(), "merged model"
    else:
        hf_model, hf_what = loaded.model.eval(), "base model (the adapter does not merge)"
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
               "threads": torch.get_num_threads(), "deploy_seconds": seconds, "hf": hf_what, "rows": []}
    pad = exported.manifest["pad_token_id"]
    for batch in args.batch:
        ids, mask = prompts(exported, batch)
        runs = {
            "exported": lambda: exported.generate(ids, mask, max_new_tokens=args.new, stop_at_eos=False),
            "aoti": lambda: compiled.generate(ids, mask, max_new_tokens=args.new, stop_at_eos=False),
            "graftr": lambda: generate_ids(gm, ids, mask, max_new_tokens=args.new, eos_token_ids=[],
                                           pad_token_id=pad).tokens,
            "hf": lambda: hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new,
                                            min_new_tokens=args.new, do_sample=False, pad_token_id=pad),
        }
        with torch.no_grad():
            same = torch.equal(runs["exported"](), runs["aoti"]()) and torch.equal(runs["exported"](), runs["graftr"]())
            for name, fn in runs.items():
                t = median_time(fn, args.repeats)
                row = {"batch": batch, "variant": name, "seconds": t, "tokens_per_s": batch * args.new / t}
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
        results.setdefault("same_tokens", {})[batch] = same

    # the bank: rows of different adapters in one batch, against one run per adapter
    from safetensors.torch import load_file

    bank = graftr_runtime.load(args.work / "bank")
    batch = max(args.batch)
    ids, mask = prompts(bank, batch)
    index = torch.arange(batch) % args.bank
    tensors = [load_file(args.work / f"adapter{i}" / "adapter.safetensors") for i in range(args.bank)]
    with torch.no_grad():
        mixed_tokens = bank.generate(ids, mask, max_new_tokens=args.new, adapter_index=index, stop_at_eos=False)
        mixed = median_time(lambda: bank.generate(ids, mask, max_new_tokens=args.new, adapter_index=index,
                                                  stop_at_eos=False), args.repeats)
        separate, separate_tokens = 0.0, torch.zeros_like(mixed_tokens)
        for i in range(args.bank):
            exported.replace(tensors[i])
            rows = index == i
            sub_ids, sub_mask = ids[rows], mask[rows]
            keep = int(sub_mask.sum(0).gt(0).long().argmax())  # drop columns that are padding in every row
            sub_ids, sub_mask = sub_ids[:, keep:], sub_mask[:, keep:]
            separate_tokens[rows] = exported.generate(sub_ids, sub_mask, max_new_tokens=args.new, stop_at_eos=False)
            separate += median_time(lambda: exported.generate(sub_ids, sub_mask, max_new_tokens=args.new,
                                                              stop_at_eos=False), args.repeats)
    results["bank"] = {"adapters": args.bank, "batch": batch, "mixed_seconds": mixed, "separate_seconds": separate,
                       "mixed_tokens_per_s": batch * args.new / mixed,
                       "separate_tokens_per_s": batch * args.new / separate,
                       "same_tokens": bool(torch.equal(mixed_tokens, separate_tokens))}
    print(json.dumps(results["bank"]), flush=True)
    print(f"\n{results['machine']}, {results['threads']} threads; {args.new} new tokens a row; hf = {hf_what}\n")
    print("| batch | variant | s | tokens/s |\n|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['batch']} | {row['variant']} | {row['seconds']:.2f} | {row['tokens_per_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
