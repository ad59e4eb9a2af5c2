"""Image-conditioned gated prompts (LLaMA-Adapter §3.3): identity at zero gates for any image, the prompt plus the
projected global image feature, the encoder frozen and not saved, recipe checks, and a tiny model that learns to
answer with the colour of the image through graftr train / eval / generate."""

from __future__ import annotations

import importlib.util
import json
import math
import re
from pathlib import Path

import pytest
import torch
from after_training_kit import cli_error
from zoo import example_inputs, tiny_model

from graftr import graft, load_adapter, save_adapter
from graftr.errors import GraftrError, RecipeError
from graftr.recipe import parse_recipe
from graftr.vision import VisionPrompt

ROOT = Path(__file__).resolve().parent.parent
STEPS = 30  # training steps of the colour test


def _demo():
    spec = importlib.util.spec_from_file_location("multimodal_demo", ROOT / "tools" / "multimodal_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random CLIP and SigLIP vision towers (hidden 16, 2 layers, 16×16 images) with image processors."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, SiglipImageProcessor,
                              SiglipVisionConfig, SiglipVisionModel)

    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    shape = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                 patch_size=8)
    CLIPVisionModel(CLIPVisionConfig(**shape)).save_pretrained(root / "clip")
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(**shape)).save_pretrained(root / "siglip")
    SiglipImageProcessor(size={"height": 16, "width": 16}).save_pretrained(root / "siglip")
    return root


def recipe(encoder, prompt: str = "linear", layers: str = "[1, 2]", pool: str = "cls", hidden: int = 8,
           condition: str = "image") -> str:
    return f"""
name: t
vision: {{encoder: {encoder}, features: {{layers: {layers}, pool: {pool}}}, hidden: {hidden}}}
rules:
  - name: gp
    match: {{op: attention}}
    adapter: {{kind: gated_prompt, length: 3, prompt: {prompt}, condition: {condition}}}
"""


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def open_gates(gm, value=0.7):
    with torch.no_grad():
        for module in gm.adapter_modules().values():
            if hasattr(module, "gate"):
                module.gate.fill_(value)


@pytest.mark.parametrize("prompt", ["linear", "hypernetwork"])
@pytest.mark.parametrize("encoder", ["clip", "siglip"])
def test_zero_gates_leave_the_model_unchanged_for_any_image(encoders, prompt, encoder):
    model = tiny_model("llama")
    pool = "cls" if encoder == "clip" else "mean"
    gm = graft(model, parse_recipe(recipe(encoders / encoder, prompt, pool=pool))).eval()
    assert gm.graftr_input_names[-1] == "pixel_values"
    [plan] = gm.plans
    assert len(plan.sites) == 2
    inputs = example_inputs(model, 3, 7)
    with torch.no_grad():
        base = model(**inputs).logits
        for seed in (0, 1):
            assert torch.equal(gm(**inputs, pixel_values=images(3, seed)).logits, base)
    with pytest.raises(TypeError, match="pixel_values is required"):
        gm(**inputs)


def test_open_gates_give_the_prompt_plus_the_image_vector(encoders):
    """Each image's output equals an unconditioned model whose prompts are P_l + I_p of that image; two images
    give two outputs."""
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(recipe(encoders / "clip"))).eval()
    open_gates(gm)
    plain = graft(tiny_model("llama"), parse_recipe(
        "name: t\nrules:\n  - {name: gp, match: {op: attention}, adapter: {kind: gated_prompt, length: 3}}\n")).eval()
    open_gates(plain)
    inputs = example_inputs(model, 1, 9)
    outputs = []
    for seed in (0, 1):
        pixels = images(1, seed)
        with torch.no_grad():
            got = gm(**inputs, pixel_values=pixels).logits
            visual = gm.get_submodule("vision_prompt")(pixels)[0]
            for target, module in gm.adapter_modules().items():
                if target.endswith(".gp"):
                    plain.get_submodule(target).prompt.copy_(module.prompt + visual)
                    plain.get_submodule(target).gate.copy_(module.gate)
            torch.testing.assert_close(got, plain(**inputs).logits, atol=1e-5, rtol=1e-5)
        outputs.append(got)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    with torch.no_grad():  # a batch of two images gives each row its own image's output
        pair = {k: v.expand(2, *v.shape[1:]) for k, v in inputs.items()}
        both = gm(**pair, pixel_values=torch.cat([images(1, 0), images(1, 1)])).logits
    torch.testing.assert_close(both, torch.cat(outputs), atol=1e-5, rtol=1e-5)


def test_the_projection_follows_the_paper(encoders):
    """I_p = MLP(concat_m post_layernorm(h_m[:, 0])); the encoder is frozen, in eval mode, and not trained."""
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(recipe(encoders / "clip", layers="[1, -1]"))).train()
    vision = gm.get_submodule("vision_prompt")
    assert isinstance(vision, VisionPrompt) and not vision.encoder.training
    assert not any(p.requires_grad for p in vision.encoder.parameters())
    assert all(p.requires_grad for p in vision.projection.parameters())
    pixels = images(2, 3)
    with torch.no_grad():
        hidden = vision.encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        norm = vision.encoder.post_layernorm
        x = torch.cat([norm(hidden[1][:, 0]), norm(hidden[2][:, 0])], dim=-1)
        first, second = vision.projection
        expected = second(torch.nn.functional.gelu(first(x)))
        torch.testing.assert_close(vision(pixels), expected)
    trainable = {n for n, p in gm.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.gp.{p}" for i in (0, 1) for p in ("prompt", "gate")} | {
        f"vision_prompt.projection.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")}
    assert gm.trainable_counts()[0] == 2 * (3 * 32 + 4) + (32 * 8 + 8) + (8 * 32 + 32)


def test_the_adapter_saves_the_projection_and_loads_back(encoders, tmp_path):
    model = tiny_model("llama")
    gm = graft(model, parse_recipe(recipe(encoders / "clip"))).eval()
    open_gates(gm)
    with torch.no_grad():
        for p in gm.get_submodule("vision_prompt.projection").parameters():
            p.add_(0.1)
    save_adapter(gm, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert not any("encoder" in name for name in saved) and "vision_prompt.projection.0.weight" in saved
    back = load_adapter(tiny_model("llama"), tmp_path / "adapter").eval()
    inputs, pixels = example_inputs(model, 2, 6), images(2, 5)
    with torch.no_grad():
        torch.testing.assert_close(back(**inputs, pixel_values=pixels).logits,
                                   gm(**inputs, pixel_values=pixels).logits, atol=0, rtol=0)


@pytest.mark.parametrize("text,message", [
    (recipe("X").replace("condition: image", "condition: image, mode: prefix"), "condition: image needs mode: gated"),
    ("name: t\nrules:\n  - {name: gp, match: {op: attention}, adapter: {kind: gated_prompt, condition: image}}\n",
     "has no vision: section"),
    (recipe("X", condition="none"), "no rule uses it"),
    (recipe("X").replace("pool: cls", "pool: max"), "pool"),
])
def test_recipe_errors(text, message):
    with pytest.raises(RecipeError, match=message):
        parse_recipe(text)


def test_encoder_errors(encoders, tmp_path):
    with pytest.raises(GraftrError, match="SigLIP has no class token"):
        graft(tiny_model("llama"), parse_recipe(recipe(encoders / "siglip")))
    with pytest.raises(GraftrError, match=r"layers \[7\]: the encoder has hidden states 0..2"):
        graft(tiny_model("llama"), parse_recipe(recipe(encoders / "clip", layers="[7]")))
    tiny_model("llama").save_pretrained(tmp_path / "not_vision")
    with pytest.raises(GraftrError, match="'llama' model; graftr takes CLIP or SigLIP"):
        graft(tiny_model("llama"), parse_recipe(recipe(tmp_path / "not_vision")))
    with pytest.raises(GraftrError, match="only a config is available for the vision encoder"):
        graft(tiny_model("llama"), parse_recipe(recipe("openai/clip-vit-large-patch14", layers="[-1]")))


def test_a_tiny_model_learns_the_colour_of_the_image(tmp_path, capsys, monkeypatch):
    """graftr train on images whose answer is their colour: the eval loss falls from the base's, graftr eval reads
    the images, and graftr generate --image answers each image with its colour."""
    from graftr import cli

    monkeypatch.chdir(tmp_path)  # the image paths of the data are relative to the data files, not to here
    demo = _demo()
    paths = demo.build(tmp_path / "demo", steps=STEPS)
    out = tmp_path / "run"
    data = str(paths["data"])

    def eval_loss(adapter) -> float:
        capsys.readouterr()
        assert cli.main(["eval", "--adapter", str(adapter), "--data", data]) == 0
        return float(re.search(r"loss\s*\S\s*([0-9.]+)", capsys.readouterr().out).group(1))

    # the recipe at init (gates at zero): the base model's loss, whatever the image
    from torch.utils.data import DataLoader
    from transformers import AutoModelForCausalLM

    from graftr.data import Collator, build_datasets
    from graftr.evaluate import evaluate
    from graftr.models import load_tokenizer, resolve
    from graftr.recipe import load_recipe
    from graftr.vision import processor_for

    init = graft(AutoModelForCausalLM.from_pretrained(paths["model"]), load_recipe(paths["recipe"]))
    tokenizer = load_tokenizer(resolve(str(paths["model"])))
    _, eval_set, _ = build_datasets(data, init.recipe.train.data, tokenizer, task="causal_lm", eval_only=True)
    assert all(Path(e["image"]).is_file() for e in eval_set.examples)
    loader = DataLoader(eval_set, batch_size=8, collate_fn=Collator(tokenizer, image_processor=processor_for(init)))
    before = evaluate(init, loader)["loss"]
    assert cli.main(["train", str(paths["recipe"]), "--model", str(paths["model"]), "--data", data,
                     "--out", str(out)]) == 0
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    after = eval_loss(out / "adapter")
    assert final["kind"] == "eval" and final["step"] == STEPS and final["loss"] == pytest.approx(after, abs=1e-4)
    # an answer that ignored the image could not go below ln 2 / 2 per token (one of two colours, then [SEP])
    assert after < 0.1 < math.log(2) / 2 < before, (before, after)
    answers = {}
    for colour in demo.COLOURS:
        capsys.readouterr()
        assert cli.main(["generate", "--adapter", str(out / "adapter"), "--prompt", demo.QUESTION,
                         "--max-new-tokens", "2", "--image", str(paths["images"] / f"{colour}_0.png")]) == 0
        answers[colour] = capsys.readouterr().out.strip().splitlines()[-1]  # after the "note:" line
    assert answers == {"red": "red", "blue": "blue"}, answers
    line = cli_error(capsys, ["generate", "--adapter", str(out / "adapter"), "--prompt", demo.QUESTION])
    assert line == "error: this adapter's prompts are conditioned on images: pass --image PATH"


@pytest.mark.slow  # one trace of the Llama-2-7B structure and the CLIP ViT-L/14 tower on the meta device
def test_multimodal_recipe_counts_its_header_on_llama2_7b():
    from graftr.models import build_model, resolve
    from graftr.recipe import load_recipe

    name = ROOT / "recipes" / "llama_adapter_multimodal.yaml"
    gm = graft(build_model(resolve("meta-llama/Llama-2-7b-hf").config, device="meta"), load_recipe(name))
    prompts, projection = 30 * 10 * 4096 + 30 * 32, (4 * 1024 * 1024 + 1024) + (1024 * 4096 + 4096)
    assert [(p.name, len(p.sites), p.params_added) for p in gm.plans] == [("llama_adapter", 30, prompts)]
    assert gm.trainable_counts()[0] == prompts + projection == 9_623_488
    encoder = gm.get_submodule("vision_prompt.encoder")
    assert encoder.config.hidden_size == 1024 and encoder.config.num_hidden_layers == 24
    assert sum(p.numel() for p in encoder.parameters()) == 303_179_776
    assert "= 9,623,488 trainable parameters" in name.read_text()


def test_data_image_column_paths_are_relative_to_the_data_file(tmp_path, monkeypatch, encoders):
    from after_training_kit import tokenizer as minilm
    from PIL import Image

    from graftr.data import Collator, DataConfig, build_datasets
    from graftr.vision import image_processor

    tok = minilm()
    tok.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    (tmp_path / "data" / "img").mkdir(parents=True)
    for name, rgb in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        Image.new("RGB", (20, 24), rgb).save(tmp_path / "data" / "img" / name)
    rows = [{"instruction": "colour?", "output": "red", "image": "img/a.png",
             "messages": [{"role": "user", "content": "colour?"}, {"role": "assistant", "content": "red"}]},
            {"instruction": "colour?", "output": "blue", "image": "img/b.png",
             "messages": [{"role": "user", "content": "colour?"}, {"role": "assistant", "content": "blue"}]}]
    data = tmp_path / "data" / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.chdir(tmp_path)  # not the data's folder
    collate = Collator(tok, image_processor=image_processor(str(encoders / "clip")))
    for fmt in ("alpaca", "chat"):
        cfg = DataConfig(format=fmt, image_column="image", eval_split=None)
        train, _, _ = build_datasets(str(data), cfg, tok, task="causal_lm")
        assert [e["image"] for e in train.examples] == [str(tmp_path / "data" / "img" / n) for n in ("a.png", "b.png")]
        batch = collate(train.examples)
        assert batch["pixel_values"].shape == (2, 3, 16, 16) and "image" not in batch
        assert batch["pixel_values"][0, 0].mean() > batch["pixel_values"][1, 0].mean()  # red vs blue channel 0
    with pytest.raises(GraftrError, match="no vision: section"):
        Collator(tok)(train.examples)
    data.write_text(json.dumps({**rows[0], "image": "img/missing.png"}) + "\n")
    with pytest.raises(GraftrError, match=r"example 0 of .*: image 'img/missing.png' is not a file \(image paths are "
                                          r"relative to"):
        build_datasets(str(data), DataConfig(format="alpaca", image_column="image", eval_split=None), tok,
                       task="causal_lm")
    with pytest.raises(ValueError, match="image_column applies to format alpaca or chat only"):
        DataConfig(format="text", image_column="image")


def test_peft_export_refuses_image_conditioned_prompts(encoders, tmp_path):
    from graftr.formats.peft import export_peft

    gm = graft(tiny_model("llama"), parse_recipe(recipe(encoders / "clip").replace("condition: image",
                                                                                   "condition: image, gate: scalar")))
    with pytest.raises(GraftrError, match="condition 'image' .*PEFT's AdaptionPrompt takes no image"):
        export_peft(gm, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
