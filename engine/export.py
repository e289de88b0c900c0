"""Export an iteration's pairs as a TRL preference dataset (conversational prompt / chosen / rejected).

Written twice: an HF dataset (`out/dataset`, for `load_from_disk`) and `out/pairs.jsonl`, with the item id,
both scores, the gold score, the curation strategy and the pair status as extra columns.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.prompts import absolute_messages, format_judgment
from store import Store


def export_pairs(store: Store, run_id: str, iteration: int, out: Path, include_rejected: bool = False) -> int:
    frame = store.export_pairs(run_id, iteration, include_rejected=include_rejected)
    records = []
    for row in frame.iter_rows(named=True):
        chosen_text, chosen_score = row["chosen_text"], row["chosen_score"]
        if row["status"] == "edited":
            chosen_score = row["edited_score"]
            chosen_text = format_judgment(row["edited_rationale"], chosen_score)
        records.append({
            "prompt": absolute_messages(row),
            "chosen": [{"role": "assistant", "content": chosen_text}],
            "rejected": [{"role": "assistant", "content": row["rejected_text"]}],
            "pair_id": row["pair_id"], "item_id": row["item_id"], "chosen_score": chosen_score,
            "rejected_score": row["rejected_score"], "gold_score": row["gold_score"], "strategy": row["strategy"],
            "status": row["status"], "margin": row["margin"],
        })
    out.mkdir(parents=True, exist_ok=True)
    with (out / "pairs.jsonl").open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    import datasets  # heavy: only here

    datasets.Dataset.from_list(records).save_to_disk(str(out / "dataset"))
    return len(records)
