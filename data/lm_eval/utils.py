"""The held-out splits of graftr's shipped instruction sets as lm-evaluation-harness datasets.

The tasks' YAML files name these functions as ``custom_dataset``; the data is read from the folders beside this
one (``data/sentiment_instruct``, ``data/dates``), so the tasks run offline from any working directory:

    graftr eval --model smollm2 --adapter ADAPTER --tasks graftr_sentiment,graftr_dates --include-path data/lm_eval --apply-chat-template

Each document is the user's message (``question``), the reference (``answer``) and, for the multiple-choice task,
the choices (``choices``; ``answer`` is then the index of the reference among them).
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent


def _rows(folder: str, split: str = "validation") -> list[dict]:
    return [json.loads(line) for line in (DATA / folder / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def _dataset(docs: list[dict]):
    import datasets

    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


def sentiment(**kwargs):
    docs = []
    for row in _rows("sentiment_instruct"):
        question, answer = row["messages"][0]["content"], row["messages"][-1]["content"]
        docs.append({"question": question, "choices": row["choices"], "answer": row["choices"].index(answer)})
    return _dataset(docs)


def dates(**kwargs):
    return _dataset([{"question": row["messages"][0]["content"], "answer": row["messages"][-1]["content"]}
                     for row in _rows("dates")])
