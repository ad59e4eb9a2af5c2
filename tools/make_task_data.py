"""Write graftr's shipped instruction sets with checkable answers (offline, deterministic; no hub).

    python tools/make_task_data.py            # rewrites data/sentiment_instruct/ and data/dates/

``data/sentiment_instruct`` — the reviews of ``data/sst2_tiny`` (400 train, 100 validation, written for graftr) as a
chat instruction: the user asks for the sentiment of the review, the assistant answers ``positive`` or ``negative``.
Every row carries ``choices`` (both answers), so ``graftr eval`` and ``graftr train`` score held-out accuracy by
answer likelihood (the answer whose tokens the model finds likelier), as lm-evaluation-harness scores multiple
choice.

``data/dates`` — a format skill: a date written one of eight ways ("March 5, 2021", "5th of March 2021",
"2021 Mar 5", ...) rewritten as ISO 8601 (``2021-03-05``). 400 train and 100 validation rows from a seeded
generator; no validation date occurs in train. Scored by exact match of the greedy answer
(``train.data.eval_metric=exact_match``).
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SENTIMENT_QUESTION = "Is the sentiment of this movie review positive or negative? Answer with one word."
DATES_QUESTION = "Rewrite this date in ISO 8601 format (YYYY-MM-DD). Answer with the date only."
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def chat(user: str, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}], **extra}


def sentiment(split: str) -> list[dict]:
    rows = [json.loads(line) for line in (REPO / "data/sst2_tiny" / f"{split}.jsonl").read_text().splitlines()]
    return [chat(f"{SENTIMENT_QUESTION}\n\nReview: {row['sentence']}", ["negative", "positive"][row["label"]],
                 choices=["positive", "negative"]) for row in rows]


def ordinal(day: int) -> str:
    suffix = "th" if 11 <= day % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(day % 10, "th")
    return f"{day}{suffix}"


def spell(d: date, style: int) -> str:
    month, short = MONTHS[d.month - 1], MONTHS[d.month - 1][:3]
    return [f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}", f"{short} {d.day}, {d.year}",
            f"the {ordinal(d.day)} of {month}, {d.year}", f"{d.year} {short} {d.day}", f"{ordinal(d.day)} {month} {d.year}",
            f"{month} {ordinal(d.day)}, {d.year}", f"{d.day}-{short}-{d.year}"][style]


def dates(seed: int = 0) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    start, span = date(1950, 1, 1), (date(2049, 12, 31) - date(1950, 1, 1)).days
    days = rng.sample(range(span + 1), 500)  # distinct dates: no validation date occurs in train
    out = {}
    for split, chosen in (("train", days[:400]), ("validation", days[400:])):
        rows = []
        for offset in chosen:
            d = start + timedelta(days=offset)
            rows.append(chat(f"{DATES_QUESTION}\n\nDate: {spell(d, rng.randrange(8))}", d.isoformat()))
        out[split] = rows
    return out


def write(folder: Path, split: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def main() -> None:
    for split in ("train", "validation"):
        write(REPO / "data/sentiment_instruct", split, sentiment(split))
    for split, rows in dates().items():
        write(REPO / "data/dates", split, rows)


if __name__ == "__main__":
    main()
