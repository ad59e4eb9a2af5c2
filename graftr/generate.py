"""Text generation with a grafted model: greedy or sampled, stopping at EOS, with a KV cache where it applies.

Prompts are left-padded into one batch; each row's positions count its real tokens (``cumsum(mask) - 1``), as
HF's ``generate`` does. With the cache (:mod:`graftr.cache`) the prompt runs once and every later step runs the
graph on one new token per row. Where the cache does not apply (encoder-decoder models, eager attention, families
graftr does not know) every step recomputes the whole sequence, which gives the same tokens, only slower; a model
whose graph takes no ``position_ids`` then generates one prompt at a time, so padding never shifts positions.

When the adapter's recipe trained on instruction data, the prompt is wrapped the same way: ``format: alpaca``
uses the recipe's prompt template, ``format: chat`` the tokenizer's chat template (``--no-template`` turns it off).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from graftr.cache import CacheUnsupported, KVCache, enable_kv_cache, kv_cache_support
from graftr.errors import GraftrError


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature`` 0 is greedy; else temperature, then top-k, then top-p."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    seed: int | None = None

    def __post_init__(self):
        if self.temperature < 0:
            raise GraftrError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GraftrError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GraftrError(f"top_k must be >= 0, got {self.top_k}")

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token of each row from its (B, V) logits."""
        if self.temperature == 0:
            return logits.argmax(-1)
        logits = logits.float() / self.temperature
        if self.top_k:
            kth = logits.topk(min(self.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, -torch.inf)
        if self.top_p < 1:
            ordered, order = logits.sort(dim=-1, descending=True)
            before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # mass of the tokens ranked above
            drop = (before >= self.top_p).scatter(-1, order, before >= self.top_p)
            logits = logits.masked_fill(drop, -torch.inf)
        return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) generated ids; after a row's EOS, pad ids
    cached: bool  # whether the KV cache was used
    note: str | None  # why not, when it was not


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's index among its row's real tokens (padding gets 0): HF generate's position_ids."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def generate_ids(gm, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int,
                 eos_token_ids: list[int], pad_token_id: int, sampling: Sampling = Sampling(), use_cache: bool = True,
                 on_logits: Callable[[int, torch.Tensor], None] | None = None,
                 policy: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
                 pixel_values: torch.Tensor | None = None) -> Generation:
    """Generate up to ``max_new_tokens`` after left-padded prompts; ``on_logits(step, logits)`` sees each step.

    ``policy(logits) -> (tokens, done)``, when given, chooses each step's tokens from the (B, V) logits and says which
    rows have ended, in place of ``sampling`` and ``eos_token_ids`` (``model.generate``: HF's processors and stopping
    criteria, :class:`graftr.hf.HFDecoding`). ``pixel_values`` (one image per prompt) go with every step to a model
    whose prompts are conditioned on images."""
    if max_new_tokens < 1:
        raise GraftrError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not bool(attention_mask.bool().any(-1).all()):
        raise GraftrError("every prompt needs at least one token")
    if bool(attention_mask[:, -1].eq(0).any()):
        raise GraftrError("prompts must be left-padded (the last column must hold a real token in every row)")
    decoder_len = max_new_tokens + 1 if getattr(gm.hf_config, "is_encoder_decoder", False) else 0
    total = decoder_len or input_ids.shape[1] + max_new_tokens
    if max(total, input_ids.shape[1]) > gm.graftr_max_positions:
        raise GraftrError(f"the prompt ({input_ids.shape[1]} tokens) and {max_new_tokens} new tokens exceed the "
                          f"{gm.graftr_max_positions} positions the model allows")
    extra = {"pixel_values": pixel_values} if pixel_values is not None else {}
    run = _Run(gm, eos_token_ids, pad_token_id, sampling, on_logits, policy, extra)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            note = kv_cache_support(gm) if use_cache else "the KV cache is turned off"
            if note is None:
                try:
                    return Generation(run.cached(input_ids, attention_mask, max_new_tokens), True, None)
                except CacheUnsupported as e:  # raised on the prompt step, before any token is chosen
                    note = str(e)
                    run = _Run(gm, eos_token_ids, pad_token_id, sampling, on_logits, policy, extra)
            if decoder_len:
                return Generation(run.seq2seq(input_ids, attention_mask, max_new_tokens), False, note)
            if "position_ids" not in gm.graftr_input_names and not bool(attention_mask.bool().all()):
                if policy is not None:
                    raise GraftrError(f"{gm.hf_class} generates padded prompts one at a time (its graph takes no "
                                      "position_ids); call generate with one prompt, or prompts of one length")
                note += "; prompts run one at a time (the graph takes no position_ids to offset padded rows)"
                rows = []
                for i, m in enumerate(attention_mask):
                    run.extra = {k: v[i:i + 1] for k, v in extra.items()}
                    rows.append(run.full(input_ids[i:i + 1, -int(m.sum()):], m[None, -int(m.sum()):],
                                         max_new_tokens))
                width = max(r.shape[1] for r in rows)
                return Generation(torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=pad_token_id)
                                             for r in rows]), False, note)
            return Generation(run.full(input_ids, attention_mask, max_new_tokens), False, note)
    finally:
        gm.train(was_training)


class _Run:
    """One generation's token choice and stopping, shared by the cached and the recomputing loops."""

    def __init__(self, gm, eos_token_ids, pad_token_id, sampling, on_logits, policy=None, extra=None):
        self.gm, self.sampling, self.on_logits, self.policy = gm, sampling, on_logits, policy
        self.extra = extra or {}  # inputs every step takes unchanged (pixel_values)
        self.eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
        self.pad = pad_token_id
        self.generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        self.tokens: list[torch.Tensor] = []
        self.done: torch.Tensor | None = None

    def choose(self, logits: torch.Tensor) -> bool:
        """Pick and record the next tokens from (B, V) logits; returns True when every row has ended."""
        step = len(self.tokens)
        if self.on_logits is not None:
            self.on_logits(step, logits)
        if self.policy is not None:
            token, self.done = self.policy(logits)
            self.tokens.append(token)
            return bool(self.done.all())
        token = self.sampling.choose(logits.cpu(), self.generator)
        if self.done is None:
            self.done = torch.zeros_like(token, dtype=torch.bool)
        token = token.masked_fill(self.done, self.pad)
        self.tokens.append(token)
        self.done |= torch.isin(token, self.eos)
        return bool(self.done.all())

    def result(self) -> torch.Tensor:
        return torch.stack(self.tokens, dim=1)

    def cached(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        """Prompt once, then one token per row per step, attending over the cache."""
        enable_kv_cache(self.gm)
        cache = KVCache(ids.shape[0], ids.shape[1] + new, device=ids.device)
        pos = positions(mask)
        next_pos = pos[:, -1:] + 1
        for _ in range(new):
            last = torch.zeros_like(ids, dtype=torch.bool)
            last[:, -1] = True  # the head only where a token is chosen: on the prompt step, not at every position
            with cache.step(mask):
                logits = self.gm.logits_at(last, input_ids=ids, attention_mask=mask, position_ids=pos, **self.extra)
            if self.choose(logits) or len(self.tokens) == new:
                break
            ids, mask, pos = self.tokens[-1][:, None].to(ids.device), torch.ones_like(next_pos), next_pos
            next_pos = next_pos + 1
        return self.result()

    def full(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        """Every step runs the whole sequence so far."""
        takes_positions = "position_ids" in self.gm.graftr_input_names
        for _ in range(new):
            extra = {"position_ids": positions(mask)} if takes_positions else {}
            logits = self.gm(input_ids=ids, attention_mask=mask, **extra, **self.extra).logits[:, -1]
            if self.choose(logits):
                break
            ids = torch.cat([ids, self.tokens[-1][:, None].to(ids.device)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return self.result()

    def seq2seq(self, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
        """Encoder-decoder: the decoder sequence grows from the start token; every step reruns encoder and decoder."""
        config = self.gm.hf_config
        start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
        decoder = torch.full((ids.shape[0], 1), start, dtype=torch.long, device=ids.device)
        for _ in range(new):
            logits = self.gm(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder,
                             **self.extra).logits[:, -1]
            if self.choose(logits):
                break
            decoder = torch.cat([decoder, self.tokens[-1][:, None].to(ids.device)], dim=1)
        return self.result()


# --------------------------------------------------------------------------------------------- text


def template_prompts(prompts: list[str], recipe, tokenizer) -> tuple[list[str], bool]:
    """``(prompts, add_special_tokens)``: the prompts wrapped as the recipe's training data wrapped instructions."""
    from graftr.data import format_prompt
    from graftr.load import recipe_data

    data = recipe_data(recipe) or {}
    if data.get("format") == "alpaca":
        template = data.get("prompt_template", "alpaca")
        return [format_prompt({"instruction": text, "input": ""}, template) for text in prompts], True
    if data.get("format") == "chat":
        if not tokenizer.chat_template:
            raise GraftrError("the adapter was trained on chat data but the tokenizer has no chat template; "
                              "pass --no-template to send the prompt as is")
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                  add_generation_prompt=True) for text in prompts]
        return rendered, False  # the template writes its own special tokens, as in training
    return list(prompts), True


def eos_ids(gm, tokenizer, generation_config=None) -> list[int]:
    """Every id that ends a sequence: the tokenizer's (if there is one), the model config's and the generation
    config's."""
    ids = []
    for value in (getattr(tokenizer, "eos_token_id", None), gm.hf_config.eos_token_id,
                  getattr(generation_config, "eos_token_id", None)):
        ids += value if isinstance(value, list) else [value] if value is not None else []
    if not ids:
        raise GraftrError("neither the tokenizer nor the model config names an EOS token; generation cannot stop")
    return ids


def generate_text(gm, tokenizer, prompts: list[str], *, max_new_tokens: int, sampling: Sampling = Sampling(),
                  recipe=None, template: bool = True, use_cache: bool = True, generation_config=None,
                  images: list[str] | None = None) -> tuple[list[str], Generation]:
    """The completions of ``prompts`` (decoded up to EOS, without special tokens) and the raw :class:`Generation`.
    ``images``: one image file per prompt (or one for all) for a model whose prompts are conditioned on images."""
    pixels = _pixel_values(gm, images, len(prompts))
    texts, special = template_prompts(prompts, recipe, tokenizer) if template else (list(prompts), True)
    eos = eos_ids(gm, tokenizer, generation_config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = eos[0]  # only padding columns the mask hides
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, add_special_tokens=special, padding=True, return_tensors="pt",
                        return_token_type_ids=False)
    finally:
        tokenizer.padding_side = side
    device = next(gm.parameters()).device
    result = generate_ids(gm, enc["input_ids"].to(device), enc["attention_mask"].to(device),
                          max_new_tokens=max_new_tokens, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id,
                          sampling=sampling, use_cache=use_cache,
                          pixel_values=pixels.to(device) if pixels is not None else None)
    outputs = []
    for row in result.tokens.tolist():
        end = next((i for i, t in enumerate(row) if t in eos), len(row))
        outputs.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    return outputs, result


# --------------------------------------------------------------------------------------------- command line


def add_arguments(parser) -> None:
    from graftr.load import add_model_arguments

    add_model_arguments(parser, adapter_required=False, several=True)
    parser.add_argument("--prompt", action="append", required=True,
                        help="the prompt; repeat the flag to generate for several prompts in one batch")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate per prompt (default 128)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="with --temperature: sample from the smallest set of tokens whose probability reaches "
                             "this (default 1.0: all)")
    parser.add_argument("--top-k", type=int, default=0,
                        help="with --temperature: sample from the k most likely tokens (default 0: all)")
    parser.add_argument("--seed", type=int, help="seed of the sampler (sampling only)")
    parser.add_argument("--no-template", action="store_true",
                        help="send the prompt as is, not wrapped in the adapter's training prompt template")
    parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence for every token")
    parser.add_argument("--image", action="append", help="an image file for an adapter whose prompts are conditioned "
                        "on images (recipe vision:); one for all prompts, or repeat the flag once per --prompt")


def main(args) -> int:
    from graftr.console import console, errors
    from graftr.load import load_adapters
    from graftr.names import GENERATIVE_TASKS, torch_dtype
    from graftr.models import load_tokenizer

    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    # several --adapter: one base, every adapter loaded into it (graftr.named), each generating alone in turn
    loaded, adapters = load_adapters(args.model, args.adapter, dtype=torch_dtype(args.dtype), console=console,
                                     trust_code=args.trust_code)
    gm = loaded.gm
    if gm.task not in GENERATIVE_TASKS:
        raise GraftrError(f"generate needs a causal_lm or seq2seq_lm model; this one is {gm.task}")
    tokenizer = load_tokenizer(loaded.source)
    for adapter, name in (adapters or {None: None}).items():
        if len(adapters) > 1:
            gm.set_adapter(name, inference_mode=True)
            console.print(f"[bold]=== {adapter}[/]", highlight=False)
        start = time.perf_counter()
        texts, result = generate_text(gm, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                                      sampling=sampling, recipe=gm.recipes.get(name), template=not args.no_template,
                                      use_cache=not args.no_cache,
                                      generation_config=_generation_config(loaded.source), images=args.image)
        seconds = time.perf_counter() - start
        if result.note:
            errors.print(f"[yellow]note:[/] no KV cache: {result.note}; every token recomputes the whole sequence",
                         highlight=False)
        for i, text in enumerate(texts):
            if len(texts) > 1:
                console.print(f"[bold]--- {i + 1}[/]")
            console.print(text, markup=False, highlight=False)
        rows, steps = result.tokens.shape
        errors.print(f"[dim]{steps} steps × {rows} prompts in {seconds:.2f} s, {rows * steps / seconds:.1f} "
                     f"tokens/s ({'KV cache' if result.cached else 'full recomputation'})[/]", highlight=False)
    return 0


def _generation_config(source):
    """The model directory's generation_config.json (extra EOS ids of chat models), or None."""
    if source.directory is None or not (source.directory / "generation_config.json").is_file():
        return None
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(source.directory), local_files_only=True)


def _pixel_values(gm, images: list[str] | None, prompts: int) -> torch.Tensor | None:
    """``pixel_values`` for ``images`` (one per prompt, or one repeated), checked against what the model takes."""
    from graftr.vision import PIXELS, pixel_values, processor_for

    takes = PIXELS in gm.graftr_input_names
    if not images:
        if takes:
            raise GraftrError("this adapter's prompts are conditioned on images: pass --image PATH")
        return None
    if not takes:
        raise GraftrError("--image: this model takes no image (its recipe has no vision: section)")
    if len(images) not in (1, prompts):
        raise GraftrError(f"{len(images)} images for {prompts} prompts: give one image, or one per prompt")
    pixels = pixel_values(processor_for(gm), images)
    return pixels.expand(prompts, *pixels.shape[1:]) if len(images) == 1 else pixels
