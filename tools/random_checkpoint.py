"""Write a model directory with random weights for a bundled config: safetensors shards, config, a tokenizer.

    python tools/random_checkpoint.py meta-llama/Llama-2-7b-hf /work/ckpt/llama2-7b-random      # ~13.5 GB, bf16

What it is for: runs that need a checkpoint of a real model's shape (the 7B memory and speed measurements of
docs/benchmarks.md) on a machine without the model hub. What it is not: a model that says anything; the weights
are random, so losses sit near ln(vocab).

Weights
    Every tensor of the HF model built from the config (its own names and shapes, read from a ``meta`` build: no
    memory), drawn N(0, initializer_range) (norm weights 1), in ``--dtype`` (bf16 by default, as Llama-3, Mistral and
    Qwen ship), seeded, written in shards of at most ``--shard-gb`` with a ``model.safetensors.index.json`` like the
    hub's. One shard's tensors exist at a time.
Tokenizer
    A byte-level BPE (the ``tokenizers`` library) trained on ``--corpus`` (default: this repository's docs) and
    a fast tokenizer with Llama's special tokens ``<unk>`` 0, ``<s>`` 1 (prepended), ``</s>`` 2 (also padding). It has at most
    ``vocab_size`` tokens, so every id it produces is a row of the embedding; byte-level, it encodes any text.
Atomic
    Everything is written into ``OUT.tmp`` and renamed to ``OUT`` at the end; an existing ``OUT`` is refused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def tokenizer(corpus: list[Path], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train([str(p) for p in corpus], trainer)
    assert bpe.get_vocab_size() <= vocab_size
    bpe.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bpe.token_to_id("<s>"))])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.pad_token = tok.eos_token
    return tok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bundled config snapshot id (graftr/snapshots), a config.json or a model dir")
    parser.add_argument("out", help="directory to create")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="largest shard (default 2 GB)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where the random values are drawn (cuda: seconds for 7B, "
                                                        "as tools/gpu_check.sh does; the values depend on it)")
    parser.add_argument("--corpus", nargs="*", type=Path, help="text files the tokenizer is trained on "
                                                               "(default: docs/*.md and README.md of this repository)")
    args = parser.parse_args()

    from safetensors.torch import save_file

    from graftr.models import build_model, resolve

    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; remove it or choose another directory", file=sys.stderr)
        return 2
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    source = resolve(args.model)
    config = source.config
    dtype = DTYPES[args.dtype]
    model = build_model(config, "causal_lm", device="meta", dtype=dtype)
    std = getattr(config, "initializer_range", 0.02)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    tensors = dict(model.state_dict(keep_vars=False))  # tied tensors appear once
    seen, names = set(), []
    for name, t in model.named_parameters():  # parameters only: non-persistent buffers are computed by the model
        if id(t) not in seen:
            seen.add(id(t))
            names.append(name)
    limit = int(args.shard_gb * 2**30)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name in shard:
            shape = tuple(tensors[name].shape)
            if name.endswith("norm.weight"):
                data[name] = torch.ones(shape, dtype=dtype)
            else:
                data[name] = (torch.randn(shape, generator=generator, device=args.device) * std).to(dtype).cpu()
            weight_map[name] = file
            total += data[name].numel() * data[name].element_size()
        save_file(data, str(tmp / file), metadata={"format": "pt"})
        print(f"{file}: {len(shard)} tensors, {sum(t.numel() * t.element_size() for t in data.values()) / 1e9:.2f} GB "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
        del data
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = dtype
    config.save_pretrained(tmp)
    corpus = args.corpus or sorted([*REPO.glob("docs/**/*.md"), REPO / "README.md"])
    tok = tokenizer(corpus, config.vocab_size)
    tok.save_pretrained(tmp)
    (tmp / "RANDOM_WEIGHTS.txt").write_text(
        f"Random weights for the structure of {source.model_id}, written by tools/random_checkpoint.py "
        f"(seed {args.seed}, {args.dtype}); the tokenizer is a byte-level BPE of {len(tok)} tokens trained on "
        f"{len(corpus)} text files. Not a trained model.\n")
    tmp.rename(out)
    print(f"wrote {out}: {len(names)} tensors, {total / 1e9:.2f} GB in {len(shards)} shards, tokenizer of {len(tok)} "
          f"tokens ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
