"""Named evaluation suites: fixed sets of imported datasets evaluated in one go (`selfrat evaluate --suite`).

`standard`: the absolute CIA BiGGen set (where response length alone predicts the gold score, so the length
baseline and the length-controlled figures matter most), RewardBench with its four sections in one dataset
(accuracy per section and their mean), and HHH alignment. Import them once with `IMPORT_COMMANDS` (paths
relative to a checkout beside ../shared; point them at your own copies otherwise).
"""

from __future__ import annotations

from store.errors import UsageError

SUITES: dict[str, tuple[str, ...]] = {"standard": ("cia-biggen", "rewardbench", "hhh")}

IMPORT_COMMANDS: dict[str, list[str]] = {
    "cia-biggen": ["selfrat import ../shared/data/cia/scored_responses_testset_biggen.tsv --dataset cia-biggen "
                   "--preset cia --split eval --on-conflict drop"],
    "rewardbench": [f"selfrat import ../shared/data/rewardbench/{section}.jsonl --dataset rewardbench --split eval"
                    for section in ("Chat", "Chat_Hard", "Safety", "Reasoning")],
    "hhh": ["selfrat import ../shared/data/prometheus/hhh_alignment_eval.json --dataset hhh "
            "--preset prometheus-pairwise --split eval"],
}


def suite_datasets(name: str, available: list[str]) -> list[str]:
    """The datasets of suite `name`; raises naming the missing ones and the commands that import them."""
    if name not in SUITES:
        raise UsageError(f"unknown suite {name!r}; suites: {', '.join(SUITES)}")
    missing = [d for d in SUITES[name] if d not in available]
    if missing:
        commands = "\n".join(f"  {c}" for d in missing for c in IMPORT_COMMANDS[d])
        raise UsageError(f"suite {name!r} needs the datasets {', '.join(missing)}; import them first:\n{commands}")
    return list(SUITES[name])
