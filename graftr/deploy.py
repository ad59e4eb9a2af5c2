"""``graftr deploy``: the adapted model as programs that run without graftr.

Mergeable adapters (IA³, InA with p = 0, scale/bias) become plain HF weights with ``graftr merge``, which every
serving engine loads. The others (InA with inhibition, gated prompts of every form) change the computation, and no
serving engine runs them. ``graftr deploy`` exports the grafted graph itself (:mod:`graftr.runtime` documents the
files and how to run them; it is copied into the artifact as ``graftr_runtime.py``):

* ``model.pt2`` — ``torch.export`` of ``input_ids [, adapter_index, pixel_values] → logits``, every weight (the
  adapters' under their own names) in its ``state_dict``;
* ``prefill.pt2`` and ``decode.pt2`` — a generation step with the KV cache as explicit inputs and outputs
  (:class:`graftr.cache.ExplicitKV`: ``cat`` of the past and the step's keys, no buffer written): the same
  module exported for steps of 2 or more tokens and for steps of one (export specializes a dimension seen at 1).
  They take the weights as an input (``torch.func.functional_call``), so the weights are stored once. Only for the
  causal LMs graftr's KV cache serves (:func:`graftr.cache.kv_cache_support`);
* the tokenizer, the generation config and ``deploy.json`` (sizes and SHA-256 of every file, the limits, EOS and
  pad ids, the prompt template the adapter was trained with, the cache layout).

Dynamic shapes: batch 1..``--max-batch``, sequence 1..``--max-length`` (default: the model's positions). After
writing, the programs are loaded back and their logits compared with the grafted model's (the run stops if they
differ by more than 1e-4). The directory is written atomically.
"""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torch.export import Dim

from graftr import runtime
from graftr.cache import ExplicitKV, cached_sites, enable_kv_cache, kv_cache_support, kv_groups
from graftr.errors import GraftrError
from graftr.generate import positions

# the self-check accepts max |logits(program) - logits(grafted model)| up to ABSOLUTE + RELATIVE[dtype] × max |logits|:
# compiled kernels sum in another order (SmolLM2 fp32, AOTInductor: 1.2e-4 on logits of magnitude ~30)
ABSOLUTE = 1e-4
RELATIVE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
EXTRA_INPUTS = ("adapter_index", "pixel_values")  # graph inputs the programs take after input_ids, in this order
_SENTINEL = "\ue000graftr-prompt\ue000"  # a private-use character no template writes


class DeployError(GraftrError):
    """The model cannot be deployed as asked (the reason is the message)."""


def deploy_refusal(gm) -> str | None:
    """Why ``gm`` cannot be exported as a standalone program (one line), else None."""
    if gm.graftr_quantized:
        return ("the base is quantized: its linear layers run bitsandbytes' kernels, which an exported program can "
                "only call with bitsandbytes installed. Deploy on the unquantized base (--model the bf16 checkpoint; "
                "the adapter was trained against its quantized copy, so outputs differ slightly), or merge a "
                "mergeable adapter into the dequantized weights with graftr merge")
    if getattr(gm.hf_config, "is_encoder_decoder", False):
        return "encoder-decoder models are not exported yet (their generation reruns the encoder)"
    return None


def extra_inputs(gm) -> list[str]:
    return [name for name in EXTRA_INPUTS if name in gm.graftr_input_names]


class LogitsProgram(nn.Module):
    """``input_ids [, adapter_index, pixel_values] → logits`` of unpadded rows: what ``model.pt2`` runs."""

    def __init__(self, gm, extra: list[str]):
        super().__init__()
        self.model, self.extra = gm, extra

    def forward(self, input_ids, *extra):
        return self.model(input_ids=input_ids, **dict(zip(self.extra, extra))).logits


class StepProgram(nn.Module):
    """One generation step on an explicit cache: what ``prefill.pt2``/``decode.pt2`` run (see :mod:`graftr.runtime`).
    The grafted model is held outside the module tree, so export lifts none of its tensors: they come in as
    ``weights`` (one copy on disk, in ``model.pt2``)."""

    def __init__(self, gm, extra: list[str], groups: list[int]):
        super().__init__()
        self.__dict__["model"] = gm
        self.extra, self.groups = extra, groups
        self.sites = cached_sites(gm)

    def forward(self, weights, input_ids, attention_mask, past_mask, past_keys, past_values, *extra):
        def call(**inputs):
            return torch.func.functional_call(self.model, weights, (), inputs, strict=False)

        return self.run(call, input_ids, attention_mask, past_mask, past_keys, past_values, extra)

    def run(self, call, input_ids, attention_mask, past_mask, past_keys, past_values, extra):
        valid = torch.cat([past_mask.bool(), attention_mask.bool()], dim=1)
        positions = (past_mask.sum(-1, keepdim=True) + attention_mask.cumsum(-1) - 1).clamp(min=0)
        cache = ExplicitKV(self.sites, list(zip(past_keys, past_values)), valid, self.groups)
        with cache.active():
            logits = call(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                          **dict(zip(self.extra, extra))).logits
        return logits, valid.long(), [k for k, _ in cache.present], [v for _, v in cache.present]


class CompiledStepProgram(StepProgram):
    """The step with the model's tensors as the program's own constants (named ``model.<path>`` as in
    ``model.pt2``): what AOTInductor compiles. The package stores none of them; the runtime hands it model.pt2's
    (``load_constants``), and can hand it another adapter's without recompiling."""

    def __init__(self, gm, extra: list[str], groups: list[int]):
        super().__init__(gm, extra, groups)
        del self.__dict__["model"]
        self.model = gm

    def forward(self, input_ids, attention_mask, past_mask, past_keys, past_values, *extra):
        return self.run(self.model, input_ids, attention_mask, past_mask, past_keys, past_values, extra)


def example_extra(gm, extra: list[str], batch: int, bank: int | None) -> list[torch.Tensor]:
    """Example values of the extra inputs for export (and the self-check)."""
    values = []
    for name in extra:
        if name == "adapter_index":
            values.append(torch.arange(batch) % bank)
        else:
            from graftr.vision import TARGET

            encoder = gm.get_submodule(TARGET).encoder
            config = getattr(encoder.config, "vision_config", encoder.config)
            param = next(encoder.parameters())
            pixels = torch.randn(batch, config.num_channels, config.image_size, config.image_size,
                                 generator=torch.Generator().manual_seed(0))
            values.append(pixels.to(param.device, param.dtype))
    return values


def _extra_dims(extra: list[str], batch) -> tuple:
    """The dynamic shapes of a ``*extra`` parameter (one tuple for all of them), or nothing."""
    return (tuple({0: batch} for _ in extra),) if extra else ()


def export_programs(gm, *, max_batch: int, max_length: int, bank: int | None = None,
                    compile: bool = False) -> dict:
    """``{"model", "prefill", "decode": ExportedProgram (the last two None without a cache), "cache": the manifest's
    cache layout, "no_cache": why there is no cache (one line) or None}``; ``compile``: also "prefill_compiled" and
    "decode_compiled", the programs :class:`CompiledStepProgram` exports for AOTInductor."""
    extra = extra_inputs(gm)
    device = next(gm.parameters()).device
    batch_dim = Dim("batch", min=1, max=max_batch) if max_batch > 1 else Dim.STATIC
    batch = 2 if max_batch > 1 else 1
    tokens = Dim("tokens", min=1, max=max_length)
    ids = torch.randint(3, gm.hf_config.vocab_size, (batch, 3), device=device)
    extras = example_extra(gm, extra, batch, bank)
    with torch.no_grad():
        model = torch.export.export(
            LogitsProgram(gm, extra), (ids, *extras), strict=False,
            dynamic_shapes=({0: batch_dim, 1: tokens}, *_extra_dims(extra, batch_dim)))
    result = {"model": model, "prefill": None, "decode": None, "cache": None, "no_cache": kv_cache_support(gm)}
    if result["no_cache"] is not None:
        return result
    enable_kv_cache(gm)
    sites = cached_sites(gm)
    mask = torch.ones_like(ids)
    probe = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), **dict(zip(extra, extras))}
    shapes = kv_groups(gm, sites, probe)
    dtype = next(p for p in gm.parameters() if p.is_floating_point()).dtype
    weights = {**dict(gm.named_parameters()), **dict(gm.named_buffers())}
    past = Dim("past", min=0, max=max_length - 1)
    keys = [torch.zeros(batch, heads, 2, dim, dtype=dtype, device=device) for _, heads, dim in shapes]
    groups = [g for g, _, _ in shapes]
    for name, width, dim in (("prefill", 3, Dim("prompt", min=2, max=max_length)), ("decode", 1, Dim.STATIC)):
        for compiled in (False, True) if compile else (False,):
            program = (CompiledStepProgram if compiled else StepProgram)(gm, extra, groups)
            step_ids = ids[:, :1].expand(-1, width).clone()
            past_mask = torch.ones(batch, 2, dtype=torch.long, device=device)
            args = (step_ids, torch.ones_like(step_ids), past_mask, keys, [k.clone() for k in keys], *extras)
            shapes_ = ({0: batch_dim, 1: dim}, {0: batch_dim, 1: dim}, {0: batch_dim, 1: past},
                       [{0: batch_dim, 2: past}] * len(keys), [{0: batch_dim, 2: past}] * len(keys),
                       *_extra_dims(extra, batch_dim))
            if not compiled:
                args, shapes_ = (weights, *args), ({k: None for k in weights}, *shapes_)
            with torch.no_grad():
                step = torch.export.export(program, args, strict=False, dynamic_shapes=shapes_)
            if compiled:
                result[f"{name}_compiled"] = step
                continue
            step.example_inputs = None  # they hold every weight: saved, they would store the model a second time
            if step.state_dict:
                raise DeployError(f"the {name} program captured {len(step.state_dict)} weights of its own (a bug)")
            result[name] = step
    stored = {**model.state_dict, **model.constants}
    names = [n for n in weights if "model." + n in stored]
    result["cache"] = {"weights": names, "dtype": str(dtype).removeprefix("torch."),
                       "sites": [[heads, dim] for _, heads, dim in shapes]}
    return result


# --------------------------------------------------------------------------------------------- the artifact
def prompt_template(recipe, tokenizer) -> dict | None:
    """The text ``graftr generate`` wraps a prompt in (``before`` + prompt + ``after``) for the adapter's training
    format, or None when prompts go as they are (or the template is not a plain wrapper)."""
    from graftr.generate import template_prompts

    if recipe is None or tokenizer is None:
        return None
    try:
        texts, special = template_prompts([_SENTINEL], recipe, tokenizer)
    except GraftrError:
        return None
    if texts == [_SENTINEL] or texts[0].count(_SENTINEL) != 1:
        return None
    before, after = texts[0].split(_SENTINEL)
    probe = "Is the sky blue?"
    if template_prompts([probe], recipe, tokenizer)[0] != [before + probe + after]:
        return None
    return {"before": before, "after": after, "add_special_tokens": special}


def aot_compile(program, path: Path, console=None) -> None:
    """AOTInductor-compile ``program`` into the package ``path``, its constants left out of the package (the
    runtime loads model.pt2's)."""
    start = time.perf_counter()
    with warnings.catch_warnings():  # torch's own pytree deprecation, raised inside the compiler
        warnings.simplefilter("ignore", FutureWarning)
        torch._inductor.aoti_compile_and_package(program, package_path=str(path),
                                                 inductor_configs={"aot_inductor.package_constants_in_so": False})
    if console is not None:
        console.print(f"compiled {path.name} with AOTInductor in {time.perf_counter() - start:.0f} s", highlight=False)


def self_check(directory: Path, gm, bank: int | None, compiled: bool = False) -> tuple[float, float]:
    """Load the written programs as the runtime does; return max |Δ logits| against ``gm`` and max |logits| (a
    left-padded batch of 2 through prefill.pt2 and one decode step when there is a cache, else model.pt2; the
    compiled steps too with ``compiled``)."""
    eager = _check_loaded(runtime.load(directory), gm, bank)
    if not compiled:
        return eager
    aoti = _check_loaded(runtime.load(directory, compiled=True), gm, bank)
    return max(eager[0], aoti[0]), max(eager[1], aoti[1])


def _check_loaded(deployed, gm, bank: int | None) -> tuple[float, float]:
    extra = extra_inputs(gm)
    batch = min(2, deployed.manifest["limits"]["batch"])
    seeded = torch.Generator().manual_seed(0)  # the same check on every run
    ids = torch.randint(3, gm.hf_config.vocab_size, (batch, 5), generator=seeded)
    extras = dict(zip(extra, example_extra(gm, extra, batch, bank)))
    kwargs = {name: extras.get(name) for name in EXTRA_INPUTS}  # Deployed's keywords
    with torch.no_grad():
        if deployed.cache is not None:
            mask = torch.ones_like(ids)
            mask[0, :2] = 0  # a left-padded row
            got, cache = deployed.step(ids, mask, **kwargs)
            want = gm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **extras).logits
            worst, scale = float((got - want)[mask.bool()].abs().max()), float(want[mask.bool()].abs().max())
            # and one decode step, against the whole sequence recomputed
            token = torch.randint(3, gm.hf_config.vocab_size, (batch, 1), generator=seeded)
            got, _ = deployed.step(token, torch.ones_like(token), cache, **kwargs)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            want = gm(input_ids=ids, attention_mask=mask, position_ids=positions(mask), **extras).logits[:, -1]
            return max(worst, float((got[:, -1] - want).abs().max())), max(scale, float(want.abs().max()))
        want = gm(input_ids=ids, **extras).logits
        return float((deployed.logits(ids, **kwargs) - want).abs().max()), float(want.abs().max())


def write_artifact(out: Path, gm, *, source, recipe, tokenizer, generation_config, max_batch: int,
                   max_length: int, adapters: dict[str, str], bank: int | None, force: bool, compile: bool = False,
                   console=None) -> dict:
    """Export ``gm`` and write the artifact to ``out`` (atomically); returns the manifest."""
    from importlib.metadata import version

    from graftr.formats.files import write_dir_atomically
    from graftr.generate import eos_ids

    if (reason := deploy_refusal(gm)) is not None:
        raise DeployError(reason)
    if max_batch < 1 or max_length < 4:
        raise DeployError(f"--max-batch must be >= 1 and --max-length >= 4 (got {max_batch}, {max_length})")
    if max_length > gm.graftr_max_positions:
        raise DeployError(f"--max-length {max_length}: the model allows {gm.graftr_max_positions} positions")
    gm.eval()
    dtype = next(p for p in gm.parameters() if p.is_floating_point()).dtype
    start = time.perf_counter()
    programs = export_programs(gm, max_batch=max_batch, max_length=max_length, bank=bank, compile=compile)
    if compile and programs["cache"] is None:
        raise DeployError(f"--compile compiles the KV-cache step, and this model has none: {programs['no_cache']}")
    exported = time.perf_counter() - start
    eos = eos_ids(gm, tokenizer, generation_config) if programs["cache"] is not None else []  # a model that generates
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else \
        (eos[0] if eos else 0)
    manifest = {
        "format": runtime.FORMAT, "version": runtime.VERSION, "graftr": version("graftr"),
        "torch": torch.__version__.split("+")[0], "model": source.model_id if source is not None else None,
        "model_class": gm.hf_class, "task": gm.task, "adapters": adapters, "bank": None,
        "limits": {"batch": max_batch, "length": max_length},
        "pixel_values": "pixel_values" in gm.graftr_input_names,
        "eos_token_ids": sorted(set(eos)), "pad_token_id": pad,
        "template": prompt_template(recipe, tokenizer),
        "cache": programs["cache"], "no_cache": programs["no_cache"], "compiled": compile,
    }
    if bank is not None:
        manifest["bank"] = {"adapters": list(adapters.values())}

    def write(tmp: Path) -> None:
        torch.export.save(programs["model"], str(tmp / "model.pt2"))
        for name in ("prefill", "decode"):
            if programs[name] is not None:
                torch.export.save(programs[name], str(tmp / f"{name}.pt2"))
            if programs.get(f"{name}_compiled") is not None:
                aot_compile(programs[f"{name}_compiled"], tmp / f"{name}.aoti.pt2", console)
        shutil.copyfile(runtime.__file__, tmp / "graftr_runtime.py")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if generation_config is not None:
            generation_config.save_pretrained(str(tmp))
        manifest["files"] = {p.name: {"bytes": p.stat().st_size, "sha256": runtime.sha256(p)}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / runtime.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        manifest["check"], scale = self_check(tmp, gm, bank, compiled=compile)
        tolerance = ABSOLUTE + RELATIVE.get(dtype, 2e-2) * scale
        if not manifest["check"] <= tolerance:
            raise DeployError(f"the exported programs' logits differ from the grafted model's by "
                              f"{manifest['check']:.2e} (> {tolerance:.1e} for logits up to {scale:.1f}); nothing "
                              "was written")

    write_dir_atomically(out, write, marker=runtime.MANIFEST, force=force)
    manifest["export_seconds"] = exported
    return manifest


# --------------------------------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    from graftr.load import add_trust_argument
    from graftr.names import DTYPES

    parser.add_argument("adapter", nargs="+", help="a graftr adapter directory; several: one artifact whose rows "
                        "each pick their adapter (the adapters must share one recipe's structure)")
    parser.add_argument("--model", help="base model directory with weights (or a cached hub id); default: the base "
                                        "recorded in the adapter")
    parser.add_argument("--out", required=True, help="the artifact directory to write")
    parser.add_argument("--force", action="store_true", help="replace --out if it holds an earlier deployment")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of the exported weights "
                        "and compute (default float32)")
    parser.add_argument("--max-batch", type=int, default=16, help="the largest batch the programs accept (default 16)")
    parser.add_argument("--max-length", type=int, help="the longest sequence, prompt and generated tokens together "
                        "(default: the model's position limit)")
    parser.add_argument("--compile", action="store_true", help="also compile the KV-cache steps with AOTInductor "
                        "(prefill.aoti.pt2, decode.aoti.pt2; a C++ compiler is needed; minutes); they read the "
                        "weights from model.pt2, and adapter tensors can be swapped without recompiling")
    parser.add_argument("--merge", action="store_true", help="a mergeable adapter: also write the merged plain HF "
                        "model to OUT/merged (what vLLM, SGLang and llama.cpp load)")
    add_trust_argument(parser)


def main(args) -> int:
    from graftr.console import console
    from graftr.formats.files import check_out
    from graftr.generate import _generation_config
    from graftr.load import load_adapters
    from graftr.merge import merge_refusal
    from graftr.models import stored_tokenizer
    from graftr.names import torch_dtype

    out = Path(args.out)
    check_out(out, runtime.MANIFEST, force=args.force)
    adapters = list(dict.fromkeys(args.adapter))
    loaded, names = load_adapters(args.model, adapters, dtype=torch_dtype(args.dtype), console=console,
                                  trust_code=args.trust_code)
    gm, bank = loaded.gm, None
    if len(adapters) > 1:
        from graftr.bank import bank_adapters

        bank = bank_adapters(gm, [names[a] for a in adapters])
    tokenizer, generation_config = stored_tokenizer(loaded.source), _generation_config(loaded.source)
    unmerged = "several adapters cannot become one set of weights" if bank is not None else merge_refusal(gm)
    manifest = write_artifact(
        out, gm, source=loaded.source, recipe=gm.recipes.get(names[adapters[0]]), tokenizer=tokenizer,
        generation_config=generation_config, max_batch=args.max_batch,
        max_length=args.max_length or min(gm.graftr_max_positions, 4096),
        adapters={Path(a).name: n for a, n in names.items()}, bank=bank, force=args.force, compile=args.compile,
        console=console)
    files = manifest["files"]
    console.print(f"wrote {out}: " + ", ".join(f"{n} ({files[n]['bytes'] / 1e6:,.1f} MB)" for n in files
                                               if n.endswith(".pt2")), highlight=False)
    console.print(f"exported in {manifest['export_seconds']:.1f} s; the programs' logits match the grafted model's "
                  f"to {manifest['check']:.1e}; batch ≤ {manifest['limits']['batch']}, length ≤ "
                  f"{manifest['limits']['length']}", highlight=False)
    if manifest["no_cache"]:
        console.print(f"[yellow]note:[/] no step program (KV cache): {manifest['no_cache']}", highlight=False)
    console.print(f"run it without graftr: python {out}/graftr_runtime.py {out} --prompt '...'", highlight=False)
    if unmerged is None:
        if args.merge:
            from graftr.merge import merge_into_hf, save_merged

            merged = load_adapters(args.model, adapters[:1], dtype=torch.float32, trust_code=args.trust_code)[0]
            save_merged(merge_into_hf(merged), merged.source, out / "merged", torch_dtype(args.dtype))
            console.print(f"merged: {out}/merged is a plain HF model (vLLM, SGLang, llama.cpp's converter)")
        else:
            console.print("[dim]this adapter merges exactly: graftr merge (or --merge) writes a plain HF checkpoint "
                          "that vLLM, SGLang and llama.cpp serve[/]")
    elif args.merge:
        raise DeployError(f"--merge: these adapters do not merge into the base weights ({unmerged}); the artifact "
                          "was written")
    return 0
