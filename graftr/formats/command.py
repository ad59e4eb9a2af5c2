"""``graftr export``: write an adapter in the other format, graftr's or Hugging Face PEFT's.

``graftr export ADAPTER --out DIR`` builds the base model's structure on the meta device (no weight is read: an
adapter's tensors are all an export needs), grafts the adapter onto it, loads its tensors (so every written tensor is
real data, and every tensor must have found its parameter), and writes the other format atomically:

* a **graftr adapter** (``manifest.json``, ``recipe.yaml``, ``adapter.safetensors``) → PEFT's
  ``adapter_config.json`` + ``adapter_model.safetensors`` with :func:`graftr.formats.peft.export_peft`;
* a **PEFT adapter** (``adapter_config.json``, no manifest) → a graftr adapter, imported with
  :func:`graftr.formats.peft.import_peft` (InA's ``lora_inhibition`` honoured) and saved with
  :func:`graftr.formats.graftr.save_adapter`. This checks a published adapter against a base without downloading its weights.

What maps (see :mod:`graftr.formats.peft`):

* ``ina`` ↔ ``LORA`` with ``lora_inhibition`` (InA's published format; stock PEFT ignores that field and runs plain
  LoRA, so an adapter with inhibition > 0 must be loaded with graftr to run as trained: a note says so);
* ``ia3`` ↔ ``IA3``;
* ``gated_prompt`` (``prompt: linear``, ``gate: scalar``, on the last N blocks of a llama/mistral without an o_proj
  bias) ↔ ``ADAPTION_PROMPT``.

Anything else is refused with the reason before anything is written, as is an adapter made for a base with a
different structure than ``--model``. The base defaults to the one recorded in the adapter (the manifest's, or the
PEFT config's ``base_model_name_or_path``).
"""

from __future__ import annotations

import json
from pathlib import Path

from graftr.errors import GraftrError

FORMATS = ("peft", "graftr")


def load_on_structure(adapter: str, model_arg: str | None, *, console=None, trust_code: bool = False):
    """The adapter (graftr's or PEFT's) grafted onto its base built on the meta device, its tensors loaded: a
    ``GraftedModel`` whose ``model_id`` is the base used (``model_arg``, else the adapter's recorded base)."""
    from graftr.load import graft_adapter, resolve_base
    from graftr.models import build_model

    base = resolve_base(model_arg, adapter, weights=False, console=console, trust_code=trust_code)
    model = build_model(base.source.config, base.task, device="meta", num_labels=base.num_labels)
    return graft_adapter(model, adapter, base)


# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from graftr.load import add_trust_argument

    parser.add_argument("adapter", help="a graftr adapter directory (from train or apply) or a PEFT adapter directory")
    parser.add_argument("--format", choices=FORMATS,
                        help="the format to write: peft (HF PEFT's adapter_config.json + adapter_model.safetensors) "
                             "or graftr (manifest.json, recipe.yaml, adapter.safetensors); default: the other one")
    parser.add_argument("--model", help="the base model (a directory, a config.json or a hub id with a local copy or "
                                        "a bundled snapshot); only its structure is read; default: the base recorded "
                                        "in the adapter")
    parser.add_argument("--out", required=True, help="the adapter directory to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds an earlier adapter")
    add_trust_argument(parser)


def main(args) -> int:
    from graftr.console import console
    from graftr.formats import is_peft

    path = Path(args.adapter)
    source_format = "peft" if path.is_dir() and is_peft(path) else "graftr"
    target = args.format or ("graftr" if source_format == "peft" else "peft")
    if target == source_format:
        what = ("a PEFT adapter (adapter_config.json, no manifest.json)" if source_format == "peft"
                else "a graftr adapter")
        raise GraftrError(f"{args.adapter} is already {what}; there is nothing to export to --format {target}")
    from graftr.formats.files import check_out
    from graftr.formats.graftr import MANIFEST
    from graftr.formats.peft import CONFIG

    check_out(Path(args.out), MANIFEST if target == "graftr" else CONFIG, force=args.force)
    gm = load_on_structure(args.adapter, args.model, console=console, trust_code=args.trust_code)
    sites = sum(len(plan.sites) for plan in gm.plans)
    kinds = ", ".join(sorted({plan.rule.adapter.kind for plan in gm.plans}))
    if target == "graftr":
        from graftr.formats.graftr import save_adapter

        save_adapter(gm, Path(args.out), force=args.force)
        adapter = gm.plans[0].rule.adapter
        options = ", ".join(f"{k} {v}" for k, v in adapter.model_dump(exclude={"kind"}).items())
        head = ", ".join(gm.recipe.trainable_modules)
        console.print(f"wrote a graftr adapter ({kinds} on {sites} modules: {options}"
                  f"{'; trained modules ' + head if head else ''}; {len(gm.adapter_state_dict())} tensors, base "
                  f"{gm.model_id}) to {args.out}")
        return 0
    from graftr.formats.peft import export_peft

    export_peft(gm, Path(args.out), force=args.force)
    config = json.loads((Path(args.out) / "adapter_config.json").read_text())
    console.print(f"wrote a PEFT {config['peft_type']} adapter ({kinds} on {sites} modules, base "
              f"{config['base_model_name_or_path']}) to {args.out}")
    if config.get("lora_inhibition"):
        console.print(f"[yellow]note:[/] lora_inhibition {config['lora_inhibition']}: stock PEFT ignores this field and "
                  "would run plain LoRA; load the adapter with graftr (import_peft, or --adapter) to run InA")
    return 0
