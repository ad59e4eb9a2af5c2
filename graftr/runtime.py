"""Run a model ``graftr deploy`` wrote, with torch (and the ``tokenizers`` library for text) only.

``graftr deploy`` copies this file into the artifact as ``graftr_runtime.py``; it imports nothing from graftr,
transformers or PEFT. In the artifact's directory::

    import torch, graftr_runtime
    model = graftr_runtime.load(".")
    logits = model.logits(input_ids)                               # = torch.export.load("model.pt2").module()(input_ids)
    tokens = model.generate(input_ids, attention_mask, max_new_tokens=32)       # greedy, KV cache
    texts = model.generate_text(["Is this review positive? ..."], max_new_tokens=32)

or ``python graftr_runtime.py DIR --prompt "..."``.

The files (``deploy.json`` lists them with their sizes and SHA-256):

``model.pt2``
    ``torch.export.save`` of the adapted model: ``input_ids`` (B, T) [, ``pixel_values``] → logits (B, T, V), with
    every weight, the adapters' included, as a named tensor of the program's ``state_dict`` (``model.<path>``).
``prefill.pt2``, ``decode.pt2``
    One step of generation with the KV cache as explicit inputs and outputs; ``prefill`` takes 2 or more new tokens
    (the prompt, after an empty past), ``decode`` one: ``(weights, input_ids (B, T), attention_mask (B, T), past_mask (B, P),
    past_keys, past_values [, pixel_values])`` → ``(logits (B, T, V), mask (B, P + T), keys, values)``; keys and
    values are one (B, heads, P, head_dim) tensor per attention site. It holds no weights: ``weights`` is the
    name → tensor map of ``model.pt2`` (no second copy on disk or in memory). Positions come from the masks, so
    left-padded prompts run in one batch.
``prefill.aoti.pt2``, ``decode.aoti.pt2`` (``graftr deploy --compile``)
    The same steps compiled by AOTInductor, without the weights as an input: they hold no tensors, and
    ``load(..., compiled=True)`` gives them model.pt2's (``load_constants``); :meth:`Deployed.replace` swaps an
    adapter's tensors in every program without recompiling.
An artifact of several adapters (``bank`` in the manifest)
    Every program takes one more input after ``input_ids``, ``adapter_index`` (B,): which adapter each row uses.
``tokenizer.json`` (and the other tokenizer files), ``generation_config.json``
    The base's tokenizer files and generation settings.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch

MANIFEST = "deploy.json"
FORMAT = "graftr-deploy"
VERSION = 1


class DeployError(Exception):
    """The artifact is missing, damaged or asked for something it cannot do (the reason is the message)."""


def sha256(path: Path) -> str:
    """The SHA-256 of a file, read in 1 MiB blocks (what the manifest records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: str | Path, *, verify: bool = False) -> dict:
    """The artifact's manifest, its files checked for presence and size (``verify``: and SHA-256)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise DeployError(f"{directory} is not a graftr deployment: no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DeployError(f"{path} is damaged: not JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DeployError(f"{path} is not a graftr deployment manifest")
    if manifest.get("version") != VERSION:
        raise DeployError(f"{path} has format version {manifest.get('version')}; this runtime reads {VERSION}")
    for name, entry in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise DeployError(f"{directory} is damaged: {name} is missing")
        if file.stat().st_size != entry["bytes"]:
            raise DeployError(f"{directory} is damaged: {name} has {file.stat().st_size:,} bytes, the manifest says "
                              f"{entry['bytes']:,}")
        if verify and sha256(file) != entry["sha256"]:
            raise DeployError(f"{directory} is damaged: {name} does not match its SHA-256 in the manifest")
    return manifest


def _load_program(path: Path):
    try:
        return torch.export.load(str(path))
    except Exception as e:  # a truncated or rewritten archive: torch raises whatever its reader met first
        raise DeployError(f"{path} cannot be loaded by torch.export.load: {str(e).splitlines()[0][:200]}") from None


class Deployed:
    """A loaded artifact: :meth:`logits`, :meth:`step`, :meth:`generate`, :meth:`generate_text`."""

    def __init__(self, directory: str | Path, *, verify: bool = False, compiled: bool = False):
        self.directory = Path(directory)
        self.manifest = manifest = read_manifest(self.directory, verify=verify)
        self.program = _load_program(self.directory / "model.pt2")
        self.model = self.program.module()
        self.stored = {**self.program.state_dict, **self.program.constants}  # model.pt2's tensors, by name
        self.bank = manifest.get("bank")
        self.cache = manifest.get("cache")
        self._tokenizer = None
        self._runners = []  # the AOTInductor packages, when compiled
        if self.cache is not None:
            stored = self.stored
            missing = [n for n in self.cache["weights"] if "model." + n not in stored]
            if missing:
                raise DeployError(f"{self.directory} is damaged: model.pt2 lacks {len(missing)} weights the step "
                                  f"program takes (e.g. {missing[0]})")
            self.weights = {n: stored["model." + n] for n in self.cache["weights"]}
            if compiled:
                self._prefill, self._decode = (self._compiled(name, stored) for name in ("prefill", "decode"))
            else:
                self._prefill = self._eager(self._load_step("prefill"))
                self._decode = self._eager(self._load_step("decode"))
        elif compiled:
            raise DeployError(f"this artifact has no KV-cache program to compile: {manifest.get('no_cache')}")
        self.compiled = compiled

    def _load_step(self, name: str):
        return _load_program(self.directory / f"{name}.pt2").module()

    def _eager(self, module):
        return lambda *args: module(self.weights, *args)

    def _compiled(self, name: str, stored: dict):
        """An AOTInductor package of the step, given model.pt2's tensors as its constants."""
        if not self.manifest.get("compiled"):
            raise DeployError(f"{self.directory} holds no compiled programs: deploy with --compile")
        path = self.directory / f"{name}.aoti.pt2"
        try:
            runner = torch._inductor.aoti_load_package(str(path))
            names = runner.get_constant_fqns()
        except Exception as e:
            raise DeployError(f"{path} cannot be loaded by AOTInductor: {str(e).splitlines()[0][:200]}") from None
        missing = [n for n in names if n not in stored]
        if missing:
            raise DeployError(f"{self.directory} is damaged: model.pt2 lacks {len(missing)} tensors {path.name} "
                              f"needs (e.g. {missing[0]})")
        runner.load_constants({n: stored[n] for n in names}, check_full_update=True)
        self._runners.append(runner)
        return runner

    def replace(self, tensors: dict[str, torch.Tensor]) -> None:
        """Use ``tensors`` (names as in the adapter's ``adapter.safetensors``, e.g. another training run of the same
        recipe) in place of the artifact's: every program, the compiled ones included (no recompilation)."""
        stored = self.stored
        unknown = [n for n in tensors if "model." + n not in stored]
        if unknown:
            raise DeployError(f"{unknown[0]} is not a tensor of this model ({len(unknown)} unknown names)")
        for name, value in tensors.items():
            old = stored["model." + name]
            if value.shape != old.shape:
                raise DeployError(f"{name}: shape {tuple(value.shape)} given, the model's is {tuple(old.shape)}")
            value = value.to(old.dtype)
            with torch.no_grad():
                self._module_tensor("model." + name).copy_(value)
            if self.cache is not None:
                self.weights[name] = value
        for runner in self._runners:
            runner.load_constants({"model." + n: self.weights[n] for n in tensors}, check_full_update=False)

    def _module_tensor(self, name: str) -> torch.Tensor:
        module = self.model
        *path, leaf = name.split(".")
        for part in path:
            module = getattr(module, part)
        return getattr(module, leaf)

    # ---- programs -------------------------------------------------------------------------------------------
    def _extra(self, adapter_index, pixel_values) -> tuple:
        extra = ()
        if self.bank is not None:
            if adapter_index is None:
                raise DeployError(f"this artifact holds {len(self.bank['adapters'])} adapters "
                                  f"({', '.join(self.bank['adapters'])}): pass adapter_index, one per row")
            extra += (torch.as_tensor(adapter_index, dtype=torch.long),)
        elif adapter_index is not None:
            raise DeployError("this artifact holds one adapter: adapter_index is for artifacts of several")
        if self.manifest["pixel_values"]:
            if pixel_values is None:
                raise DeployError("this adapter's prompts are conditioned on images: pass pixel_values")
            extra += (pixel_values,)
        return extra

    def logits(self, input_ids: torch.Tensor, *, adapter_index=None, pixel_values=None) -> torch.Tensor:
        """(B, T, V) logits of unpadded rows (model.pt2)."""
        self._check(input_ids.shape[0], input_ids.shape[1])
        return self.model(input_ids, *self._extra(adapter_index, pixel_values))

    def empty_cache(self, batch: int) -> tuple:
        """``(mask, keys, values)`` of no tokens, for the first :meth:`step`."""
        if self.cache is None:
            raise DeployError(f"this artifact has no KV-cache program: {self.manifest.get('no_cache')}")
        dtype = getattr(torch, self.cache["dtype"])
        empty = [torch.zeros(batch, heads, 0, dim, dtype=dtype) for heads, dim in self.cache["sites"]]
        return torch.zeros(batch, 0, dtype=torch.long), empty, [t.clone() for t in empty]

    def step(self, input_ids, attention_mask, cache=None, *, adapter_index=None, pixel_values=None):
        """Run ``input_ids`` (B, T) with their ``attention_mask`` after ``cache`` (None: the first step);
        returns ``(logits (B, T, V), cache)``."""
        cache = self.empty_cache(input_ids.shape[0]) if cache is None else cache
        mask, keys, values = cache
        self._check(input_ids.shape[0], mask.shape[1] + input_ids.shape[1])
        program = self._decode if input_ids.shape[1] == 1 else self._prefill
        logits, mask, keys, values = program(input_ids, attention_mask.long(), mask, keys, values,
                                                *self._extra(adapter_index, pixel_values))
        return logits, (mask, keys, values)

    def _check(self, batch: int, length: int) -> None:
        limits = self.manifest["limits"]
        if batch > limits["batch"]:
            raise DeployError(f"a batch of {batch} rows: this artifact was exported for at most {limits['batch']}")
        if length > limits["length"]:
            raise DeployError(f"{length} tokens: this artifact was exported for at most {limits['length']}")

    # ---- generation -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 128, adapter_index=None, pixel_values=None,
                 stop_at_eos: bool = True) -> torch.Tensor:
        """Greedy tokens (B, N) after left-padded prompts; after a row's EOS, the pad id (as ``graftr generate``).
        ``stop_at_eos=False`` always generates ``max_new_tokens`` (benchmarks)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if bool(attention_mask[:, -1].eq(0).any()):
            raise DeployError("prompts must be left-padded (the last column must hold a real token in every row)")
        eos = torch.tensor(self.manifest["eos_token_ids"] if stop_at_eos else [], dtype=torch.long)
        pad = self.manifest["pad_token_id"]
        self._check(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        logits, cache = self.step(input_ids, attention_mask, adapter_index=adapter_index, pixel_values=pixel_values)
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        tokens = []
        while True:
            token = logits[:, -1].float().argmax(-1).masked_fill(done, pad)
            tokens.append(token)
            done |= torch.isin(token, eos)
            if bool(done.all()) or len(tokens) == max_new_tokens:
                return torch.stack(tokens, dim=1)
            logits, cache = self.step(token[:, None], torch.ones_like(token[:, None]), cache,
                                      adapter_index=adapter_index, pixel_values=pixel_values)

    def tokenizer(self):
        """The base's tokenizer (the ``tokenizers`` library), left padding with the artifact's pad id."""
        if self._tokenizer is None:
            file = self.directory / "tokenizer.json"
            if not file.is_file():
                raise DeployError(f"{self.directory} holds no tokenizer.json: pass token ids to generate()")
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(file))
            self._tokenizer.enable_padding(direction="left", pad_id=self.manifest["pad_token_id"])
        return self._tokenizer

    def encode(self, prompts: list[str], *, template: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of ``prompts``, left-padded, wrapped in the adapter's training template as
        ``graftr generate`` wraps them (``template=False``: as given)."""
        wrap = self.manifest.get("template") if template else None
        texts = [wrap["before"] + p + wrap["after"] for p in prompts] if wrap else list(prompts)
        encoded = self.tokenizer().encode_batch(texts, add_special_tokens=wrap["add_special_tokens"] if wrap else True)
        return (torch.tensor([e.ids for e in encoded], dtype=torch.long),
                torch.tensor([e.attention_mask for e in encoded], dtype=torch.long))

    def generate_text(self, prompts: list[str], *, max_new_tokens: int = 128, template: bool = True,
                      adapter_index=None, pixel_values=None) -> list[str]:
        """Completions of ``prompts``, wrapped in the adapter's training template as ``graftr generate`` does
        (``template=False``: as given), decoded up to EOS without special tokens."""
        tokenizer = self.tokenizer()
        ids, mask = self.encode(prompts, template=template)
        tokens = self.generate(ids, mask, max_new_tokens=max_new_tokens, adapter_index=adapter_index,
                               pixel_values=pixel_values)
        eos = set(self.manifest["eos_token_ids"])
        out = []
        for row in tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in eos), len(row))
            out.append(tokenizer.decode(row[:end], skip_special_tokens=True))
        return out


def load(directory: str | Path, *, verify: bool = False, compiled: bool = False) -> Deployed:
    """Load the artifact in ``directory`` (``verify``: also check every file's SHA-256; ``compiled``: run the
    KV-cache steps with the AOTInductor packages ``graftr deploy --compile`` wrote)."""
    return Deployed(directory, verify=verify, compiled=compiled)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate with a graftr deployment (torch and tokenizers only)")
    parser.add_argument("directory")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--adapter", action="append", help="an artifact of several adapters: the adapter's name, "
                        "once for all prompts or once per prompt")
    parser.add_argument("--no-template", action="store_true", help="send the prompt as is")
    parser.add_argument("--verify", action="store_true", help="check every file's SHA-256 first")
    parser.add_argument("--compiled", action="store_true", help="run the AOTInductor programs (deploy --compile)")
    args = parser.parse_args(argv)
    try:
        model = load(args.directory, verify=args.verify, compiled=args.compiled)
        index = None
        if args.adapter:
            names = (model.bank or {}).get("adapters", [])
            unknown = [a for a in args.adapter if a not in names]
            if unknown:
                raise DeployError(f"--adapter {unknown[0]}: this artifact holds {', '.join(names) or 'one adapter'}")
            chosen = args.adapter * len(args.prompt) if len(args.adapter) == 1 else args.adapter
            if len(chosen) != len(args.prompt):
                raise DeployError(f"{len(args.adapter)} --adapter for {len(args.prompt)} prompts: give one, or one "
                                  "per prompt")
            index = [names.index(a) for a in chosen]
        for text in model.generate_text(args.prompt, max_new_tokens=args.max_new_tokens,
                                        template=not args.no_template, adapter_index=index):
            print(text)
    except DeployError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
