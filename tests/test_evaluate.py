"""Evaluation: the numbers equal a manual loop over the same data, token-weighted, and the CLI prints them."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from after_training_kit import cli_error, model_dir, randomize_and_save, tokenizer
from torch.utils.data import DataLoader

from graftr import cli, graft
from graftr.data import Collator, DataConfig, build_datasets
from graftr.errors import GraftrError
from graftr.evaluate import evaluate
from graftr.recipe import parse_recipe

SENTENCES = [("a fine film", 1), ("dull and long", 0), ("the cast is superb", 2), ("i left early", 0),
             ("worth every minute of it", 1), ("a mess", 0), ("surprisingly moving", 2)]
INSTRUCTIONS = [("Name a colour.", "", "Blue."), ("Add the numbers.", "2 and 3", "5"),
                ("Write a greeting.", "", "Hello there, how are you today?"), ("Reverse the word.", "stop", "pots")]

CLS_RECIPE = """
name: ia3_cls
task: seq_cls
num_labels: 3
trainable_modules: [classifier]
rules:
  - {name: ia3_kv, match: {path: "bert.encoder.layer.*.attention.self.{key,value}"}, adapter: {kind: ia3}}
train: {lr: 1.0e-3, max_steps: 1, data: {format: classification, text_column: sentence}}
"""
LM_RECIPE = """
name: ia3_lm
rules:
  - {name: ia3_kv, match: {path: "model.layers.*.self_attn.{k_proj,v_proj}"}, adapter: {kind: ia3}}
train: {lr: 1.0e-3, max_steps: 1, data: {format: alpaca}}
"""


def write_split(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def adapted(root, arch, recipe, task=None, **overrides):
    """A base directory (model + tokenizer) and a saved adapter with every trainable tensor moved from its init."""
    model = model_dir(root / "base", arch, task, **overrides)
    return randomize_and_save(graft(model, parse_recipe(recipe)), root / "adapter")


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    root = tmp_path_factory.mktemp("cls")
    (root / "data").mkdir()
    rows = [{"sentence": s, "label": y} for s, y in SENTENCES]
    write_split(root / "data" / "train.jsonl", rows[:3])
    write_split(root / "data" / "validation.jsonl", rows)
    return root, adapted(root, "bert", CLS_RECIPE, "seq_cls", num_labels=3)


@pytest.fixture(scope="module")
def language_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    (root / "data").mkdir()
    rows = [{"instruction": i, "input": x, "output": o} for i, x, o in INSTRUCTIONS]
    write_split(root / "data" / "train.jsonl", rows[:1])
    write_split(root / "data" / "validation.jsonl", rows)
    return root, adapted(root, "llama", LM_RECIPE)


def eval_set(root, fmt, task, **fields):
    _, evaluation, _ = build_datasets(str(root / "data"), DataConfig(format=fmt, **fields), tokenizer(), task=task)
    return evaluation


def loader(dataset, batch_size):
    return DataLoader(dataset, batch_size=batch_size, collate_fn=Collator(tokenizer()))


def test_classification_equals_a_manual_loop(classifier):
    root, gm = classifier
    data = eval_set(root, "classification", "seq_cls", text_column="sentence")
    losses, hits = [], []
    with torch.no_grad():
        for example in data:  # one example at a time: no padding at all
            inputs = {k: torch.tensor([v]) for k, v in example.items() if k != "labels"}
            logits = gm(**inputs).logits[0]
            losses.append(F.cross_entropy(logits, torch.tensor(example["labels"])).item())
            hits.append(int(logits.argmax()) == example["labels"])
    for batch_size in (1, 3):
        got = evaluate(gm, loader(data, batch_size))
        assert got.keys() == {"loss", "accuracy", "examples"} and got["examples"] == len(SENTENCES)
        assert got["loss"] == pytest.approx(sum(losses) / len(losses), abs=1e-6)
        assert got["accuracy"] == sum(hits) / len(hits)


def test_classification_with_known_predictions(classifier):
    root, gm = classifier
    data = eval_set(root, "classification", "seq_cls", text_column="sentence")
    bias = gm.get_parameter("classifier.bias")
    saved = bias.detach().clone()
    try:
        with torch.no_grad():
            bias.copy_(torch.tensor([0.0, 0.0, 1e4]))  # every example is predicted as class 2
        got = evaluate(gm, loader(data, 4))
    finally:
        with torch.no_grad():
            bias.copy_(saved)
    assert got["accuracy"] == 2 / 7  # two of the seven sentences are labelled 2
    assert got["loss"] > 1e3  # the five others are scored about -1e4


def test_language_model_loss_is_token_weighted(language_model):
    root, gm = language_model
    data = eval_set(root, "alpaca", "causal_lm")
    total, count, per_example = 0.0, 0, []
    with torch.no_grad():
        for example in data:
            logits = gm(input_ids=torch.tensor([example["input_ids"]])).logits[0, :-1]
            labels = torch.tensor(example["labels"][1:])
            scored = labels != -100
            loss = F.cross_entropy(logits[scored], labels[scored], reduction="sum").item()
            total, count = total + loss, count + int(scored.sum())
            per_example.append(loss / int(scored.sum()))
    one, four = evaluate(gm, loader(data, 1)), evaluate(gm, loader(data, 4))
    assert one["tokens"] == four["tokens"] == count and one["examples"] == four["examples"] == len(INSTRUCTIONS)
    assert one["loss"] == pytest.approx(total / count, abs=1e-6)
    assert four["loss"] == pytest.approx(total / count, abs=1e-6)
    assert four["perplexity"] == pytest.approx(math.exp(total / count))
    assert abs(four["loss"] - sum(per_example) / len(per_example)) > 1e-3  # not a mean of per-example means


def test_unsupported_task_is_refused(classifier):
    _, gm = classifier
    with pytest.raises(GraftrError, match="token_cls"):
        evaluate(gm, [], task="token_cls")


def table_values(text: str) -> dict[str, str]:
    """metric → value from a rich table printed by the CLI."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if len(cells) == 2 and cells[0]:
            rows[cells[0]] = cells[1]
    return rows


def test_cli_eval_classification(classifier, capsys):
    root, gm = classifier
    capsys.readouterr()
    assert cli.main(["eval", "--adapter", str(root / "adapter"), "--data", str(root / "data"), "--batch-size", "2"]) == 0
    shown = table_values(capsys.readouterr().out)
    expected = evaluate(gm, loader(eval_set(root, "classification", "seq_cls", text_column="sentence"), 2))
    assert shown == {"loss": f"{expected['loss']:.4f}", "accuracy": f"{expected['accuracy']:.4f}", "examples": "7"}


def test_cli_eval_language_model_with_overrides(language_model, capsys):
    root, gm = language_model
    capsys.readouterr()
    argv = ["eval", "--model", str(root / "base"), "--adapter", str(root / "adapter"), "--data", str(root / "data")]
    assert cli.main([*argv, "data.max_length=40"]) == 0
    out = capsys.readouterr().out
    shown = table_values(out)
    expected = evaluate(gm, loader(eval_set(root, "alpaca", "causal_lm", max_length=40), 8))
    assert shown["loss"] == f"{expected['loss']:.4f}" and shown["perplexity"] == f"{expected['perplexity']:.4f}"
    assert shown["tokens"] == str(expected["tokens"])
    assert "truncated" in out  # the data pipeline's notes are shown


def test_cli_eval_errors(language_model, capsys):
    root, _ = language_model
    argv = ["eval", "--adapter", str(root / "adapter"), "--data", str(root / "data")]
    assert "no split 'test'" in cli_error(capsys, [*argv, "--split", "test"])
    assert "not data.KEY=VALUE" in cli_error(capsys, [*argv, "max_length=3"])
    assert "data.max_length" in cli_error(capsys, [*argv, "data.max_length=0"])
    assert "hidden_size: adapter 32 vs model 4096" in cli_error(capsys, [*argv, "--model", "meta-llama/Llama-2-7b-hf"])
    assert "only a config" in cli_error(capsys, [*argv, "--model", str(root / "base" / "config.json")])
    assert "does not exist" in cli_error(capsys, ["eval", "--adapter", str(root / "nope"), "--data", "x"])


# ---- held-out answers: accuracy by answer likelihood, exact match (train.data.eval_metric) ----------------------
CHOICES = [("Is fire hot or cold?", "hot"), ("Is snow hot or cold?", "cold"), ("Is the sun hot or cold?", "hot"),
           ("Is ice hot or cold?", "cold"), ("Is lava hot or cold?", "hot")]


@pytest.fixture(scope="module")
def answers_set(tmp_path_factory, language_model):
    root = tmp_path_factory.mktemp("answers")
    (root / "data").mkdir()
    rows = [{"instruction": q, "input": "", "output": a, "choices": ["hot", "cold", "warm"]} for q, a in CHOICES]
    write_split(root / "data" / "train.jsonl", rows[:2])
    write_split(root / "data" / "validation.jsonl", rows)
    return root, language_model[1]


def test_logits_at_equals_the_full_logits_there(language_model):
    root, gm = language_model
    batch = Collator(tokenizer())([e for e in eval_set(root, "alpaca", "causal_lm")])
    mask = batch["labels"] != -100
    with torch.no_grad():
        full = gm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        picked = gm.logits_at(mask, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert picked.shape == (int(mask.sum()), full.shape[-1])
    torch.testing.assert_close(picked, full[mask].float(), rtol=0, atol=1e-5)


def test_choice_accuracy_equals_a_manual_likelihood_loop(answers_set):
    from graftr.evaluate import answer_metric

    root, gm = answers_set
    tok = tokenizer()
    _, evaluation, info = build_datasets(str(root / "data"), DataConfig(format="alpaca"), tok, task="causal_lm")
    answers = info.answers
    assert answers.metric == "choice" and len(answers) == len(CHOICES) and answers.references == [a for _, a in CHOICES]
    hits, total, count = 0, 0.0, 0
    with torch.no_grad():
        for group, gold in zip(answers.options, answers.gold):
            scores = []
            for option in group:  # one option at a time, no padding: the summed log-likelihood of its answer tokens
                logits = gm(input_ids=torch.tensor([option["input_ids"]])).logits[0, :-1]
                labels = torch.tensor(option["labels"][1:])
                scored = labels != -100
                scores.append(-F.cross_entropy(logits[scored], labels[scored], reduction="sum").item())
            hits += int(max(range(len(group)), key=scores.__getitem__) == gold)
            total, count = total - scores[gold], count + int((torch.tensor(group[gold]["labels"][1:]) != -100).sum())
    got = answer_metric(gm, answers, Collator(tok), tok, batch_size=4)
    assert got["accuracy"] == hits / len(CHOICES)
    assert got["loss"] == pytest.approx(total / count, abs=1e-5) and got["tokens"] == count
    # the reference options are the eval split's examples: the same loss as evaluate() computes on the split
    assert got["loss"] == pytest.approx(evaluate(gm, loader(evaluation, 2))["loss"], abs=1e-5)


MIXED = [("Is fire hot or cold?", "hot"), ("Is snow hot or cold?", "cold as ice"), ("Is tea hot or cold?", "warm"),
         ("Is ice hot or cold?", "cold"), ("Is lava hot or cold?", "hot")]
KINDS = {"ia3": "{kind: ia3}", "gated_prompt": "{kind: gated_prompt, length: 3}",
         "prefix": "{kind: gated_prompt, length: 3, mode: prefix}", "ina": "{kind: ina, rank: 4}"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_choices_share_their_prompt_and_score_as_one_row_each(tmp_path, kind, monkeypatch):
    """Where the KV cache applies, the choices of an example run their shared prompt once and their answers on the
    cached prompt; the scores equal one row per option (choices of different lengths, sharing a first token or
    not, on every kind); an adapter that adds keys to attention (prefix prompts) scores one row per option."""
    import graftr.evaluate as evaluating

    target = "model.layers.*.self_attn" + ("" if kind in ("gated_prompt", "prefix") else ".{k_proj,v_proj}")
    recipe = f"name: {kind}\nrules:\n  - {{name: r, match: {{path: \"{target}\"}}, adapter: {KINDS[kind]}}}\n" \
             "train: {data: {format: alpaca}}\n"
    (tmp_path / "data").mkdir()
    rows = [{"instruction": q, "input": "", "output": a, "choices": ["hot", "cold as ice", "warm", "cold"]}
            for q, a in MIXED]
    write_split(tmp_path / "data" / "validation.jsonl", rows)
    write_split(tmp_path / "data" / "train.jsonl", rows[:1])
    gm = adapted(tmp_path, "llama", recipe)
    gm.eval()
    tok = tokenizer()
    _, _, info = build_datasets(str(tmp_path / "data"), DataConfig(format="alpaca"), tok, task="causal_lm")
    shared = []  # the runs that shared the prompt to the end
    real = evaluating._shared_prompt_scores
    monkeypatch.setattr(evaluating, "_shared_prompt_scores", lambda *a: (real(*a), shared.append(kind))[0])
    with torch.no_grad():
        got = evaluating._option_scores(gm, info.answers.options, Collator(tok), 3, "cpu")
        monkeypatch.setattr(evaluating, "_direct", lambda model: None)  # one row per option, full logits
        rowwise = evaluating._option_scores(gm, info.answers.options, Collator(tok), 3, "cpu")
    assert shared == ([] if kind == "prefix" else [kind])
    assert got[1] == rowwise[1] and len(got[0]) == 4 * len(MIXED)
    assert got[0] == pytest.approx(rowwise[0], abs=1e-4)


def test_exact_match_compares_greedy_answers(answers_set, monkeypatch):
    from graftr.evaluate import answer_metric, greedy_answers

    root, gm = answers_set
    tok = tokenizer()
    cfg = DataConfig(format="alpaca", eval_metric="exact_match")
    _, _, info = build_datasets(str(root / "data"), cfg, tok, task="causal_lm")
    answers = info.answers
    texts = greedy_answers(gm, tok, answers.prompts, max_new_tokens=6, batch_size=2)
    with torch.no_grad():  # the same greedy tokens one prompt at a time, by recomputing the whole sequence
        for prompt, text in zip(answers.prompts, texts):
            ids = torch.tensor([prompt])
            new = []
            for _ in range(6):
                token = int(gm(input_ids=ids).logits[0, -1].argmax())
                if token == tok.eos_token_id:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
            assert text == tok.decode(new, skip_special_tokens=True)
    got = answer_metric(gm, answers, Collator(tok), tok, batch_size=2)
    room = max(len(tok(r, add_special_tokens=False)["input_ids"]) for r in answers.references) + 8
    expected = sum(t.strip() == r for t, r in zip(greedy_answers(gm, tok, answers.prompts, max_new_tokens=room),
                                                   answers.references)) / len(CHOICES)
    assert got == {"exact_match": expected}
    # references the model does give (its own greedy answers) count, the others do not
    import graftr.evaluate

    monkeypatch.setattr(graftr.evaluate, "_answer_room", lambda *a: 6)
    answers.references = [texts[0].strip(), texts[1].strip(), "x", "x", "x"]
    assert answer_metric(gm, answers, Collator(tok), tok, batch_size=2) == {"exact_match": 2 / 5}


def test_answer_metric_errors(answers_set, tmp_path):
    root, _ = answers_set
    tok = tokenizer()
    bad = tmp_path / "bad"
    bad.mkdir()
    write_split(bad / "train.jsonl", [{"instruction": "q", "input": "", "output": "a"}])
    write_split(bad / "validation.jsonl", [{"instruction": "q", "input": "", "output": "a", "choices": ["b", "c"]}])
    with pytest.raises(GraftrError, match=r"its answer 'a' is not one of its choices \('b', 'c'\)"):
        build_datasets(str(bad), DataConfig(format="alpaca"), tok, task="causal_lm")
    write_split(bad / "validation.jsonl", [{"instruction": "q", "input": "", "output": "a", "choices": "a"}])
    with pytest.raises(GraftrError, match="'choices' must be a list of two or more strings"):
        build_datasets(str(bad), DataConfig(format="alpaca"), tok, task="causal_lm")
    with pytest.raises(GraftrError, match="eval_metric choice needs a 'opts' column"):
        build_datasets(str(root / "data"), DataConfig(format="alpaca", eval_metric="choice", choices_column="opts"),
                       tok, task="causal_lm")
    with pytest.raises(GraftrError, match="scores the answers of alpaca or chat data on a causal_lm model"):
        build_datasets(str(root / "data"), DataConfig(format="alpaca", eval_metric="exact_match"), tok,
                       task="seq2seq_lm")
    # auto: no choices column, no answer metric
    write_split(bad / "validation.jsonl", [{"instruction": "q", "input": "", "output": "a"}])
    assert build_datasets(str(bad), DataConfig(format="alpaca"), tok, task="causal_lm")[2].answers is None


def test_cli_eval_prints_the_answer_metric(answers_set, language_model, capsys):
    root, gm = answers_set
    base, _ = language_model
    capsys.readouterr()
    argv = ["eval", "--model", str(base / "base"), "--adapter", str(base / "adapter"), "--data", str(root / "data")]
    assert cli.main(argv) == 0
    shown = table_values(capsys.readouterr().out)
    assert set(shown) >= {"loss", "perplexity", "accuracy"} and 0 <= float(shown["accuracy"]) <= 1
    assert cli.main([*argv, "data.eval_metric=exact_match"]) == 0
    assert "exact_match" in table_values(capsys.readouterr().out)


def test_greedy_answers_stop_at_the_models_positions(language_model):
    """A held-out prompt near the model's last position gets what room is left; one that fills them answers ""."""
    from graftr.evaluate import greedy_answers

    _, gm = language_model
    tok = tokenizer()
    limit = gm.graftr_max_positions
    word = tok("cat", add_special_tokens=False)["input_ids"][0]
    almost, full = [word] * (limit - 1), [word] * limit
    texts = greedy_answers(gm, tok, [almost, full], max_new_tokens=8, batch_size=1)
    assert texts[1] == "" and len(tok(texts[0], add_special_tokens=False)["input_ids"]) <= 1
