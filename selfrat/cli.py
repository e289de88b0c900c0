"""`selfrat`: every step the app can start, as a command; the composition root of the three rooms.

    selfrat import data.jsonl --dataset mydata --preset feedback-collection
    selfrat run config.yaml --run-id first
    selfrat status first --json
    selfrat pairs list --run first --iteration 1 --status auto
    selfrat pairs accept --run first --iteration 1 123 456 --who alice
    selfrat jobs; selfrat cancel first
    selfrat export first --iteration 1 --out pairs/
    selfrat demo

Each command parses its options, calls one engine (or store) function and prints what it returns. Errors
go through `cli_command`: the project's own (`SelfratError`) become one `error: ...` line and exit 2, a
cancel (SIGTERM / Ctrl-C) `cancelled` and exit 130; anything else is a bug and keeps its traceback. This
module may import engine, store and ui; none of them imports it. Heavy libraries (torch, TRL) are imported
inside the engine functions that need them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer
from pydantic import ValidationError

from engine import jobs, runs
from engine.config import format_validation_error
from engine.metrics import HEADLINE_METRICS
from engine.workspace import Workspace
from store import PAIR_STATUSES, Cancelled, SelfratError, UsageError, default_who, queries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Self-rationalizing LLM judges: import, sample, curate, train (DPO), evaluate.")

# No envvar here: engine.workspace.default_workspace() is the one resolver of the default (Workspace.open(None)).
WorkspaceOpt = Annotated[Optional[Path], typer.Option("--workspace", "-w",
                                                      help="Workspace dir (default $SELFRAT_HOME, else ./.selfrat).")]


@app.callback()
def _main(ctx: typer.Context, workspace: WorkspaceOpt = None) -> None:
    ctx.obj = workspace  # every command opens it through _ws(ctx)


def _ws(ctx: typer.Context) -> Workspace:
    return Workspace.open(ctx.obj)


def cli_command(fn):
    """A command body's errors as exit codes: a `SelfratError` (or a config that does not validate) is one
    `error: <message>` on stderr and exit 2; a cancel (`Cancelled` from the runner's signal handler, or
    Ctrl-C) is `cancelled` and exit 130. Any other exception is a bug: it keeps its traceback."""
    @functools.wraps(fn)
    def command(*args, **kwargs):
        main = threading.current_thread() is threading.main_thread()  # only there can handlers be set
        previous = signal.signal(signal.SIGINT, _interrupt_once) if main else None
        try:
            return fn(*args, **kwargs)
        except SelfratError as e:
            _fail(str(e))
        except ValidationError as e:
            _fail(format_validation_error(e, "options"))
        except (Cancelled, KeyboardInterrupt):
            _exit_interrupted("cancelled")
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
    return command


def _interrupt_once(signum, frame) -> None:
    """Ctrl-C as one KeyboardInterrupt: later ones are ignored while the command says what it left behind
    (polars re-raises an interrupt Python has already delivered, so a second one would cut that message)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def _exit_interrupted(message: str) -> None:
    """Say `message` and exit 130 (`_interrupt_once` keeps a second Ctrl-C from cutting the message)."""
    typer.echo(message, err=True)
    raise typer.Exit(130) from None


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# ------------------------------------------------------------------ data

_IMPORT_EPILOG = """Mapping targets (--map TARGET=SOURCE, or TARGET=TEMPLATE with {column} fields and \\n for a
newline): instruction, input (the text the instruction works on; rendered after it in the judge prompt), response,
response_b, label, reference, rubric (an object) or criteria + score1_description..score5_description,
gold_score, gold_scores (several annotators: mean), gold_feedback, split, and for pairwise data prompt,
chosen, rejected, response_a; section and subset (metadata that drives the per-section / per-subset
breakdowns; RewardBench reports the mean of sections). Any other column is kept in meta.
Without --split, items go to the split named by a split column, else to train."""


@app.command("import", epilog=_IMPORT_EPILOG)
@cli_command
def import_(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="JSONL/JSON/CSV/TSV/Parquet file (JSON and Parquet are recognised "
                                             "by content), a saved datasets dir, or a hub id.")],
    dataset: Annotated[str, typer.Option(help="Name to import into.")],
    preset: Annotated[Optional[str], typer.Option(help="feedback-collection | prometheus-prompt | "
                                                       "prometheus-pairwise | cia | pairwise (default: detected "
                                                       "from the columns).")] = None,
    map_: Annotated[Optional[list[str]], typer.Option("--map", help="TARGET=SOURCE, or TARGET=TEMPLATE such as "
                                                      "'prompt={instruction}\\n\\n{input}' (repeatable; targets "
                                                      "below).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="NAME=VALUE: a column with this value for every "
                                                      "row of this file, e.g. subset=adversarial "
                                                      "(repeatable).")] = None,
    label_majority: Annotated[Optional[str], typer.Option(
        help="COL1,COL2,...: the label is the value more than half of these columns hold (before --label-a/-b/"
             "-tie apply); a row without one is invalid, or a tie when --label-tie is given.")] = None,
    split: Annotated[Optional[str], typer.Option(help="train | eval for every row (default: a split column, "
                                                      "else train).")] = None,
    label_a: Annotated[Optional[str], typer.Option(help="Label value meaning response A wins.")] = None,
    label_b: Annotated[Optional[str], typer.Option(help="Label value meaning response B wins.")] = None,
    label_tie: Annotated[Optional[str], typer.Option(help="Label value meaning a tie.")] = None,
    on_conflict: Annotated[str, typer.Option(
        help="The same content with different gold/labels: error (refuse, rows named) | first | last | drop.")
    ] = "error",
    replace: Annotated[bool, typer.Option("--replace", help="Replace the dataset's items with this file's, in "
                                                            "one transaction (corrections, a new split).")] = False,
    force: Annotated[bool, typer.Option("--force", help="With --replace: even while runs use the dataset.")] = False,
    encoding: Annotated[Optional[str], typer.Option(help="Text encoding of the file (default utf-8), e.g. "
                                                         "latin-1, cp1252.")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Import the valid rows and list the skipped ones.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the import report as JSON.")] = False,
) -> None:
    """Import rubric-graded (absolute) or preference (pairwise) data into a dataset: all rows or none.

    Duplicates (the same content twice) are merged into their first row and reported; the same content with
    two different labels or gold scores is a conflict (see --on-conflict). Re-importing a file adds what is new;
    a corrected file or another --split needs --replace."""
    from engine.importers import import_file, parse_constants, parse_mapping

    committed = False
    try:
        report = import_file(
            _ws(ctx).store(), path, dataset=dataset, preset=preset, mapping=parse_mapping(map_ or []),
            constants=parse_constants(set_ or []), label_majority=label_majority.split(",") if label_majority else None,
            split=split, label_a=label_a, label_b=label_b, label_tie=label_tie, skip_invalid=skip_invalid,
            on_conflict=on_conflict, encoding=encoding, replace=replace, force=force,
        )
        committed = True
    except KeyboardInterrupt:
        _exit_interrupted("interrupted: " + ("the import was committed before the interrupt" if committed else
                                             f"nothing was written: dataset {dataset!r} is as it was"))
    if as_json:
        typer.echo(_strict_json(report))
        return
    for e in report["skipped_rows"]:
        typer.echo(f"skipped row {e['row']}: {e['reason']}", err=True)
    for line in _import_lines(report):
        typer.echo(line)


def _import_lines(r: dict) -> list[str]:
    counts = r["split_counts"]
    splits = next(iter(counts)) if len(counts) == 1 else " + ".join(f"{s} {n}" for s, n in counts.items()) or "none"
    how = f"--split {r['split']}" if r["split"] else "no --split: the split column, else train"
    lines = [f"{r['dataset']}: imported as {splits} ({how}): {r['inserted']} new items; {r['kind']}, preset"
             f" {r['preset']}" + (f"; replaced {r['replaced']} earlier items" if r["replaced"] else "")]
    if r["items_built"] == r["source_rows"] - r["skipped"]:  # one item per row: account for every row
        lines.append(f"  {r['source_rows']} source rows = {r['inserted']} imported + {r['existing']} already present"
                     f" + {r['duplicates']} duplicates merged + {r['conflict_dropped'] + r['kept_stored']} conflicting"
                     f" left out + {r['skipped']} skipped")
    else:
        lines.append(f"  {r['source_rows']} source rows ({r['skipped']} skipped) gave {r['items_built']} items ="
                     f" {r['inserted']} imported + {r['existing']} already present + {r['duplicates']} duplicates"
                     f" merged + {r['conflict_dropped'] + r['kept_stored']} conflicting left out")
    if r["duplicate_groups"]:
        shown = ", ".join(f"row {row} (+{n})" for row, n in r["duplicate_groups"][:10])
        more = " ..." if len(r["duplicate_groups"]) > 10 else ""
        lines.append(f"  duplicates merged into their first row: {shown}{more}")
    if r["conflicts"]:
        lines.append(f"  {r['conflicts']} conflict(s) in the file resolved by --on-conflict {r['on_conflict']}:"
                     f" {r['conflict_dropped']} item(s) left out")
    if r["kept_stored"]:
        lines.append(f"  {r['kept_stored']} item(s) conflict with stored items; the stored ones were kept")
    if r["empty_responses"] or r["non_text_responses"]:
        lines.append(f"  responses: {r['empty_responses']} empty (kept), {r['non_text_responses']} numbers/booleans"
                     " turned into text")
    if r["majority_ties"]:
        lines.append(f"  {r['majority_ties']} row(s) without a majority label taken as ties")
    lines += [f"  note: {n}" for n in r["notes"]]
    return lines


datasets_app = typer.Typer(help="List imported datasets (no subcommand); show or delete one.")
app.add_typer(datasets_app, name="datasets")


@datasets_app.callback(invoke_without_command=True)
@cli_command
def datasets(ctx: typer.Context, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List imported datasets with item counts per split."""
    if ctx.invoked_subcommand is not None:
        return
    frame = _ws(ctx).store().datasets()
    if as_json:
        typer.echo(_strict_json({"datasets": frame.drop("created_at").to_dicts()}))
    elif frame.height == 0:
        typer.echo("no datasets yet: `selfrat import PATH --dataset NAME`")
    else:
        for r in frame.iter_rows(named=True):
            typer.echo(f"{r['name']:<24} {r['kind']:<9} {r['items']:>7} items"
                       f"  train {r['train']:>6}  eval {r['eval']:>6}")


def _item_prompts(item: dict) -> dict[str, str]:
    """The user turn of each judge prompt the item renders to (pairwise: each side's absolute, and relative)."""
    from engine.prompts import absolute_messages, relative_messages

    makers = ({"absolute": lambda: absolute_messages(item)} if item.get("kind") != "pairwise" else
              {"absolute_a": lambda: absolute_messages(item, "response"),
               "absolute_b": lambda: absolute_messages(item, "response_b"),
               "relative": lambda: relative_messages(item)})
    out = {}
    for name, make in makers.items():
        try:
            out[name] = make()[-1]["content"]
        except (KeyError, TypeError, ValueError) as e:
            out[name] = f"(cannot render: {e})"
    return out


def _clip(text, n: int = 300) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + f"... [{len(text) - n} more chars]"


_SHOWN_FIELDS = ("instruction", "input", "response", "response_b", "label", "gold_score", "gold_scores",
                 "gold_feedback", "reference", "criteria", *(f"score{k}_description" for k in range(1, 6)), "meta")


@datasets_app.command("show")
@cli_command
def datasets_show(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    limit: Annotated[int, typer.Option(min=0, help="First N items in source order (0 = all).")] = 5,
    split: Annotated[Optional[str], typer.Option(help="train | eval only.")] = None,
    prompt: Annotated[bool, typer.Option("--prompt", help="Also the exact judge prompt each item renders to.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """The items as stored (every non-null column), optionally with the judge prompts they render to."""
    if split not in (None, "train", "eval"):
        raise UsageError(f"--split must be train or eval, got {split!r}")
    store = _ws(ctx).store()
    frame = store.dataset_items(name, limit=limit, split=split)
    info = store.datasets().filter(name=name).row(0, named=True)
    items = [_finite(r) for r in frame.iter_rows(named=True)]
    if prompt:
        for item in items:
            item["prompts"] = _item_prompts(item)
    if as_json:
        typer.echo(_strict_json({"dataset": name, "kind": info["kind"],
                                 "counts": {"items": info["items"], "train": info["train"], "eval": info["eval"]},
                                 "items": items}, default=str))
        return
    typer.echo(f"{name}: {info['kind']}, {info['items']} items (train {info['train']}, eval {info['eval']});"
               f" showing {len(items)}" + (f" of split {split}" if split else "") + " in source order")
    for item in items:
        typer.echo(f"\n--- row {item['source_row']}  item {item['item_id']}  {item['split']}  {item['kind']}")
        for key in _SHOWN_FIELDS:
            if item.get(key) is not None:
                typer.echo(f"{key}: {_clip(item[key])}")
        for label, text in item.get("prompts", {}).items():
            typer.echo(f"[prompt: {label}]\n{text}")


@datasets_app.command("rm")
@cli_command
def datasets_rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Dataset name.")],
    force: Annotated[bool, typer.Option("--force", help="Delete even while runs use it (they are kept).")] = False,
) -> None:
    """Delete a dataset (its items and import history). Refused while a run uses it, unless --force."""
    from store.store import DatasetInUse

    try:
        res = _ws(ctx).store().delete_dataset(name, force=force)
    except DatasetInUse as e:
        raise UsageError(f"dataset {name!r} is used by run(s) {', '.join(e.runs)} (their config names it or their"
                         f" judgments are of its items); `selfrat datasets rm {name} --force` deletes it anyway"
                         ) from None
    typer.echo(f"deleted dataset {name!r}: {res['items']} items")
    if res["runs"]:
        typer.echo(f"orphaned run(s) {', '.join(res['runs'])}: {res['judgments']} judgments and"
                   f" {res['pairs']} pairs point at deleted items (kept)")


# ------------------------------------------------------------------ runs


@app.command()
@cli_command
def run(
    ctx: typer.Context,
    config: Annotated[Path, typer.Argument(help="Run config YAML.")],
    run_id: Annotated[Optional[str], typer.Option("--run-id")] = None,
) -> None:
    """Run seed evaluation, then K iterations of sample -> curate -> train -> evaluate."""
    _print_status(runs.start_run(_ws(ctx), config, run_id, echo=typer.echo))


@app.command()
@cli_command
def resume(
    ctx: typer.Context,
    run_id: str,
    iterations: Annotated[Optional[int], typer.Option(
        "--iterations", min=0, help="Run up to iteration K (never below the iterations already done).")] = None,
    config: Annotated[Optional[Path], typer.Option(
        "--config", help="New sampling/curation/training/evaluation (and iterations) for the iterations not yet "
                         "done; the rest (model, train_dataset, eval_datasets, item caps) must stay the same.")] = None,
) -> None:
    """Continue a stopped or failed run from where its stored rows end; optionally run more iterations."""
    _print_status(runs.resume_run(_ws(ctx), run_id, iterations, config))


def _stage_command(stage: str):
    @cli_command
    def command(
        ctx: typer.Context,
        run_id: Annotated[str, typer.Option("--run", help="Run id.")],
        iteration: Annotated[int, typer.Option(help="Iteration (1..K; evaluate also takes 0).")],
    ) -> None:
        result = runs.run_stage(_ws(ctx), run_id, stage, iteration)
        if result:
            typer.echo(_strict_json(result, indent=2, default=str))
    command.__doc__ = f"Run the {stage} stage of one iteration of a run (a no-op when it is done)."
    return command


for _stage in runs.STAGES:
    app.command(_stage)(_stage_command(_stage))


@app.command("curate")
@cli_command
def curate_(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Option("--run", help="Run id.")],
    iteration: Annotated[int, typer.Option(help="A sampled iteration (1..K).")],
    strategy: Annotated[Optional[str], typer.Option(help="gold | majority | meta (default: the run's).")] = None,
    min_margin: Annotated[Optional[int], typer.Option(help="Smallest score miss (gold, majority) or rating gap"
                                                           " (meta) of a pair.")] = None,
    max_pairs_per_item: Annotated[Optional[int], typer.Option(help="Cap on pairs per item.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write nothing; print the report these settings"
                                                            " would give.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Curate an iteration's preference pairs and print the curation report. Options override the run's
    curation settings: without --dry-run they are saved in the run's config and the iteration is curated
    again (refused once its pairs were reviewed or trained on)."""
    report = runs.curate(_ws(ctx), run_id, iteration, strategy=strategy, min_margin=min_margin,
                    max_pairs_per_item=max_pairs_per_item, dry_run=dry_run, echo=not as_json)
    if as_json:
        typer.echo(_strict_json(report))
    else:
        _print_curation(report, f"{run_id} iteration {iteration}" + (" (dry run: nothing written)" if dry_run else ""))


def _print_curation(r: dict, what: str) -> None:
    p = r.get("params", {})
    typer.echo(f"curation of {what}: strategy {r.get('strategy')}, min_margin {p.get('min_margin')},"
               f" max_pairs_per_item {p.get('max_pairs_per_item')}, balance_scores {p.get('balance_scores')},"
               f" dedupe {p.get('dedupe')}, use_forced {p.get('use_forced')}"
               + (f", rated by {r['rater_model']}" if r.get("rater_model") else ""))
    if "items" not in r:  # a report from before curation reports had counts
        return
    typer.echo(f"  {r['judgments']} judgments of {r['items']} items; usable {r.get('usable', '?')},"
               f" duplicates {r.get('duplicates', 0)}")
    typer.echo(f"  {r['pairs']} pairs from {r['items_with_pairs']} items; skipped: "
               + " ".join(f"{k}={v}" for k, v in r["skipped"].items()))
    typer.echo("  chosen score: " + " ".join(f"{k}={v}" for k, v in r["chosen_score_hist"].items()))
    gap = "rating gap" if r.get("strategy") == "meta" else "margin"
    typer.echo(f"  {gap}: " + " ".join(f"{k}={v}" for k, v in r["margin_hist"].items()))
    bias = r.get("length_bias")
    if bias and bias.get("chosen_mean_chars") is not None:
        typer.echo(f"  rationale length: chosen {bias['chosen_mean_chars']:.0f} chars, rejected"
                   f" {bias['rejected_mean_chars']:.0f} chars (ratio {_fmt(bias['ratio'])})")
    for warning in r.get("warnings", []):
        typer.echo(f"  warning: {warning}")


def _finite(v):
    """`v` with NaN and +-inf (in dicts and lists too) as None: a missing figure, printed or in JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _strict_json(obj, **dumps_kw) -> str:
    """JSON any parser accepts: NaN and +-inf become null (json.dumps alone writes bare NaN / Infinity).
    Every `--json` output goes through here."""
    return json.dumps(_finite(obj), allow_nan=False, **dumps_kw)


@app.command()
@cli_command
def evaluate(
    ctx: typer.Context,
    run_id: Annotated[Optional[str], typer.Option("--run", help="Evaluate an iteration of this run.")] = None,
    iteration: Annotated[Optional[int], typer.Option(help="With --run: the iteration (0 = seed).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Standalone: 'embedded', a checkpoint dir or hub id.")] = None,
    dataset: Annotated[Optional[list[str]], typer.Option(help="Standalone: dataset(s) to evaluate on.")] = None,
    suite: Annotated[Optional[str], typer.Option(
        help="A named set of datasets (standard: cia-biggen, rewardbench, hhh), with --model or --run.")] = None,
    method: Annotated[Optional[list[str]], typer.Option(
        help="Standalone: greedy (one greedy judgment), expected (its probability-weighted score, G-Eval; "
             "comes with greedy), self-consistency (mean and majority of N sampled scores), best-of-n (the "
             "sample the meta-judge rates highest), relative (A/B in both orders, pairwise data). Repeat for "
             "several (default: greedy). The response-length baseline is always reported beside them.")] = None,
    n: Annotated[int, typer.Option("--n", help="Samples per item for self-consistency / best-of-n.")] = 5,
    split: Annotated[str, typer.Option(
        help="eval | train | all. A dataset with no items in the split is an error (exit 2).")] = "eval",
    max_items: Annotated[Optional[int], typer.Option(
        help="The first N items of each dataset in source order (the rows of the imported file, in order), "
             "taken per section where the data has sections (meta 'section', else 'subset'; e.g. "
             "RewardBench): the same N always selects the same items.")] = None,
    backend: Annotated[Optional[str], typer.Option(
        help="Sampling backend: transformers (CPU/GPU) or vllm (GPU, the gpu extra). Default: the run's with "
             "--run, else transformers.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Rationale budget.")] = 256,
    force_score: Annotated[Optional[bool], typer.Option(
        "--force-score/--no-force-score", help="Close a rationale without a score with a forced one (default: "
        "on for the embedded model only).")] = None,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for 95% intervals (0 = off).")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help=(
        'Print one strict-JSON object on stdout: {"run_id": ID, "iteration": K, "metrics": {DATASET: '
        '{METRIC: VALUE}}}, NaN/inf as null; nothing else goes to stdout.'))] = False,
) -> None:
    """Evaluate a judge: an iteration of a run, or any model on datasets (standalone) with any method.

    Metrics of a method other than greedy are named '<method>/<metric>' (e.g. self-consistency-mean/pearson).
    Counts go with their rates: failures / judgments = parse_failure_rate (judgments not parsed ok), forced /
    judgments = forced_rate (scores that had to be forced); unscored_pairs: pairs left without a score.

    The evaluation is stored as a run (standalone: a new one; its id goes to stderr, and into --json).
    Progress (done/total per batch, and an ETA) goes to stderr; the full log is in the run's run.log:
    <workspace>/runs/<run_id>/run.log.
    """
    result = runs.evaluate(
        _ws(ctx), run_id=run_id, iteration=iteration, model=model, datasets=dataset or [], suite=suite,
        methods=method or ["greedy"],
        n=n, split=split, max_items=max_items, backend=backend, max_new_tokens=max_new_tokens,
        force_score=force_score, bootstrap=bootstrap, echo=not as_json, notify=lambda line: typer.echo(line, err=True))
    if as_json:
        typer.echo(_strict_json(result))
    else:
        for name, values in result["metrics"].items():
            _print_metrics(name, values, indent="")


@app.command()
@cli_command
def compare(
    ctx: typer.Context,
    first: Annotated[str, typer.Argument(help="Judge A: RUN:K (iteration K's greedy evaluation) or RUN:K:METHOD "
                                              "(expected, raw, self-consistency-mean, self-consistency-majority, "
                                              "best-of-n, relative, length-baseline), e.g. r1:0:best-of-n.")],
    second: Annotated[str, typer.Argument(help="Judge B, the same way; deltas are B - A.")],
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset both judged (default: the one dataset both judged; an error names them when several).")
    ] = None,
    metric: Annotated[Optional[list[str]], typer.Option(
        help="Only these figures (repeatable): pearson, spearman, kendall, exact, within1, partial_pearson "
             "(absolute data); accuracy, section_mean_accuracy (pairwise). Default: all.")] = None,
    bootstrap: Annotated[int, typer.Option(min=0, help="Paired bootstrap resamples (0 = no interval, no p).")] = 2000,
    seed: Annotated[int, typer.Option(help="Bootstrap seed (same seed, same intervals).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help=(
        'Print one strict-JSON object: {"a", "b", "dataset", "kind", "items", "only_a", "only_b", "bootstrap", '
        '"seed", "metrics": {METRIC: {"a", "b", "delta", "lo", "hi", "p", "n"}}}, NaN as null.'))] = False,
) -> None:
    """Paired comparison of two judges on the items both judged: each figure for A and B, B - A with a 95%
    paired-bootstrap interval (items resampled, both judges at the same indices) and a two-sided p.

    In the table, * marks a difference whose interval excludes 0. docs/evaluation.md, "Paired comparisons"."""
    from engine.compare import compare_judges, significant

    res = compare_judges(_ws(ctx).store(), first, second, dataset, metrics=metric, bootstrap=bootstrap, seed=seed)
    if as_json:
        typer.echo(_strict_json(res))
        return
    left_out = f"; left out, judged by one only: {res['a']} {res['only_a']}, {res['b']} {res['only_b']}" \
        if res["only_a"] or res["only_b"] else ""
    typer.echo(f"{res['dataset']} ({res['kind']}): A = {res['a']}, B = {res['b']}; {res['items']} items judged by"
               f" both{left_out}; {res['bootstrap']} paired resamples, seed {res['seed']}")
    typer.echo(f"  {'metric':<22} {'A':>7} {'B':>7} {'B-A':>7}  {'95% CI':<18}   {'p':>6} {'n':>5}")
    for name, f in res["metrics"].items():
        ci = f"[{_signed(f['lo'])}, {_signed(f['hi'])}]" if f["lo"] == f["lo"] else "-"
        typer.echo(f"  {name:<22} {_fmt(f['a']):>7} {_fmt(f['b']):>7} {_signed(f['delta']):>7}  {ci:<18}"
                   f" {'*' if significant(f) else ' '} {_fmt(f['p']):>6} {f['n']:>5}")
    typer.echo("  * the 95% interval of B - A excludes 0")


def _signed(v) -> str:
    return "nan" if v is None or v != v else f"{v:+.3f}"


@app.command("single-stage")
@cli_command
def single_stage(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument(help="The iterative run whose baseline this is.")],
    new_run_id: Annotated[Optional[str], typer.Option("--run-id", help="Default: RUN-single-stage.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Single-stage DPO baseline: one iteration from RUN's seed judge on the data of all its iterations at
    once; recorded in RUN's iteration 0 as 'single-stage-dpo/<metric>'. Reruns resume."""
    from engine.iteration import run_single_stage

    metrics = run_single_stage(_ws(ctx), run_id, new_run_id, echo=not as_json)
    if as_json:
        typer.echo(_strict_json(metrics))
    else:
        for name, values in metrics.items():
            _print_metrics(name, values, indent="")


@app.command()
@cli_command
def status(
    ctx: typer.Context,
    run_id: Annotated[Optional[str], typer.Argument(help="A run id; all runs when omitted.")] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Progress and metrics of runs (safe to call while a run is writing)."""
    store = _ws(ctx).store()
    data = store.run_status(run_id) if run_id else store.all_status()
    if as_json:
        typer.echo(_strict_json(data))
    elif run_id:
        _print_status(data)
    elif not data["runs"]:
        typer.echo("no runs yet")
    else:
        for r in data["runs"]:
            _print_status(r)


def _fmt(v) -> str:
    return "nan" if v is None or v != v else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _print_metrics(name: str, m: dict, indent: str = "    ") -> None:
    """One line per method: the headline figures, a correlation with its 95% interval when there is one."""
    methods = sorted({k.rsplit("/", 1)[0] if "/" in k else "" for k in m})
    for method in methods:
        prefix = f"{method}/" if method else ""
        parts = []
        for k in HEADLINE_METRICS:
            v = m.get(prefix + k)
            if v is None and prefix + k not in m:
                continue
            lo, hi = m.get(f"{prefix}{k}_lo"), m.get(f"{prefix}{k}_hi")
            ci = f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None and k == "pearson" else ""
            parts.append(f"{k}={_fmt(v)}{ci}")
        if parts:
            typer.echo(f"{indent}{name}{' ' + method if method else ''}: " + "  ".join(parts))
        if m.get(prefix + "saturated") == 1:
            typer.echo(f"{indent}  warning: score saturation (one score takes over half the judgments, gold is "
                       "balanced)")


def _print_status(s: dict) -> None:
    typer.echo(f"run {s['id']} [{s['kind']}] {s['status']}" + (f"  error: {s['error']}" if s.get("error") else ""))
    contamination = s.get("reports", {}).get("contamination", {})
    if contamination.get("overlapping_items"):
        typer.echo(f"  contamination: {contamination['overlapping_items']} training items occur in the eval sets"
                   " (left out of training)")
    for it in s["iterations"]:
        stages = " ".join(f"{k}={v}" for k, v in it["stages"].items())
        pairs = " ".join(f"{k}={v}" for k, v in it["pairs"].items() if v)
        precision = " ".join(f"{k}={v}" for k, v in it.get("precision", {}).items() if v)
        typer.echo(f"  iteration {it['index']}: judgments={it['judgments']} parsed={it['parsed']} {stages}"
                   + (f" pairs: {pairs}" if pairs else "") + (f" precision: {precision}" if precision else ""))
        if it.get("rollout_judgments"):  # a GRPO iteration: its trainer's rollouts, stored as judgments
            typer.echo(f"    GRPO rollouts: {it['rollout_judgments']} over {it['rollout_steps']} steps, mean reward "
                       f"{it['rollout_reward']:.3f}")
        for warning in it.get("curation_warnings", []):
            typer.echo(f"    curation warning: {warning}")
        for name, m in it["metrics"].items():
            _print_metrics(name, m)


@app.command()
@cli_command
def export(
    ctx: typer.Context,
    run_id: Annotated[str, typer.Argument()],
    iteration: Annotated[int, typer.Option()],
    out: Annotated[Path, typer.Option(help="Output directory (HF dataset in out/dataset, plus out/pairs.jsonl).")],
    include_rejected: Annotated[bool, typer.Option("--all", help="Also export pairs a human rejected.")] = False,
) -> None:
    """Export an iteration's pairs in TRL's preference format (conversational prompt/chosen/rejected)."""
    from engine.export import export_pairs

    n = export_pairs(_ws(ctx).store(), run_id, iteration, out, include_rejected=include_rejected)
    typer.echo(f"exported {n} pairs to {out}")


@app.command()
@cli_command
def demo(
    ctx: typer.Context,
    items: Annotated[int, typer.Option(help="Training items to sample.")] = 32,
    n: Annotated[int, typer.Option(help="Judgments per item.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Rationale budget.")] = 96,
    sft_items: Annotated[int, typer.Option(help="Gold rationales the seed SFT trains on.")] = 48,
    run_id: Annotated[Optional[str], typer.Option("--run-id")] = None,
    prepare_only: Annotated[bool, typer.Option(
        "--prepare-only", help="Import the demo dataset and build the embedded checkpoint; run nothing "
                               "(then launch the iteration from the app's Launch page).")] = False,
) -> None:
    """Import the demo dataset, SFT the embedded judge on its gold rationales, run one iteration, and print the
    raw model, J_SFT and iteration 1 side by side."""
    from engine.demo import prepare_demo, run_demo

    if prepare_only:
        prepare_demo(_ws(ctx), echo=typer.echo)
    else:
        run_demo(_ws(ctx), items=items, n=n, max_new_tokens=max_new_tokens, sft_items=sft_items, run_id=run_id,
                 echo=typer.echo)


@app.command("app")
@cli_command
def serve(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port on 127.0.0.1.")] = 8501,
    workspace: Annotated[Optional[Path], typer.Option(
        "--workspace", "-w",
        help="Workspace dir (default: the global --workspace, $SELFRAT_HOME, ./.selfrat).")] = None,
) -> None:
    """Start the Streamlit app on 127.0.0.1 (Ctrl-C stops it)."""
    spec = importlib.util.find_spec("ui.app")  # by module name: wherever the ui package is installed
    if spec is None or not spec.origin:
        raise UsageError("the app is not installed: there is no module ui.app")
    app_py = Path(spec.origin).resolve()
    # Absolute: the app may run from another cwd, and it reads its workspace from SELFRAT_HOME.
    root = Workspace.open(workspace or ctx.obj).root.resolve()
    argv = [sys.executable, "-m", "streamlit", "run", str(app_py), "--server.address", "127.0.0.1",
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    checkout = app_py.parents[1]  # the checkout holding ui/: its .streamlit/config.toml has the theme
    if (checkout / ".streamlit" / "config.toml").is_file():
        os.chdir(checkout)  # streamlit reads .streamlit/config.toml from the cwd
    typer.echo(f"selfrat app on http://127.0.0.1:{port} (workspace {root})")
    sys.stdout.flush()
    # Replace this process: Ctrl-C and signals reach streamlit itself, with no parent left behind.
    os.execvpe(argv[0], argv, {**os.environ, "SELFRAT_HOME": str(root)})


# ------------------------------------------------------------------ review: the Pairs page's actions

pairs_app = typer.Typer(no_args_is_help=True, help="Review an iteration's curated pairs, as the app's Pairs page "
                                                   "does: list them, accept / reject / swap / edit / note.")
app.add_typer(pairs_app, name="pairs")

RunOpt = Annotated[str, typer.Option("--run", help="Run id.")]
IterationOpt = Annotated[int, typer.Option(help="A curated iteration (1..K).")]
PairIds = Annotated[Optional[list[int]], typer.Argument(help="Pair ids (from `selfrat pairs list`).",
                                                        show_default=False)]
StatusOpt = Annotated[Optional[str], typer.Option(help=f"Only pairs with this status: {' | '.join(PAIR_STATUSES)}"
                                                       " (with --all, or for list).")]
AllOpt = Annotated[bool, typer.Option("--all", help="Every pair of the iteration (with --status: every pair with "
                                                    "that status), instead of PAIR_IDs; needs --yes.")]
YesOpt = Annotated[bool, typer.Option("--yes", help="With --all: do it (without: say how many pairs it would "
                                                    "change, change nothing, exit 2).")]
WhoOpt = Annotated[Optional[str], typer.Option(help="Who made the decision, kept in the audit log (default "
                                                    "$SELFRAT_USER, else $USER, as in the app).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]
NoteOpt = Annotated[Optional[str], typer.Option(help="A note kept with each pair.")]


@pairs_app.command("list")
@cli_command
def pairs_list(
    ctx: typer.Context,
    run_id: RunOpt,
    iteration: IterationOpt,
    status: StatusOpt = None,
    limit: Annotated[int, typer.Option(min=0, help="The first N pairs by id (0 = all).")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """The iteration's pairs as a human left them (status, swaps and edits applied): what the Pairs page shows."""
    frame, total = queries.pairs_page(_ws(ctx).store(), run_id, iteration, status, 0, limit or 2**62)
    if as_json:
        typer.echo(_strict_json({"run_id": run_id, "iteration": iteration, "status": status, "total": total,
                                 "pairs": frame.to_dicts()}, default=str))
        return
    typer.echo(f"run {run_id} iteration {iteration}: {total} pairs" + (f" with status {status}" if status else "")
               + (f", showing the first {frame.height}" if frame.height < total else ""))
    for r in frame.iter_rows(named=True):
        edited = f" edited score {r['edited_score']}" if r["edited_score"] is not None else ""
        typer.echo(f"  {r['pair_id']}  {r['status']:<8}  chosen {r['chosen_score']} rejected {r['rejected_score']}"
                   f"{edited}  item {r['item_id']}" + ("  swapped" if r["swapped"] else "")
                   + (f"  note: {r['note']}" if r["note"] else ""))


def _review(ctx: typer.Context, action: str, run_id: str, iteration: int, pair_ids: list[int] | None,
            status: str | None, all_: bool, yes: bool, who: str | None, as_json: bool, **change) -> None:
    """One review action on PAIR_IDs or on --all under --status, through `Store.review_pairs` (the Pairs page's
    write), with its audit rows."""
    if bool(pair_ids) == all_:
        raise UsageError("name the pairs (PAIR_IDs) or pass --all, not both" if all_ else
                         "name the pairs (PAIR_IDs), or pass --all for every pair (of --status)")
    if status is not None and not all_:
        raise UsageError("--status selects pairs with --all; leave it out with PAIR_IDs")
    store = _ws(ctx).store()
    if all_ and not yes:
        n = len(queries.pair_ids(store, run_id, iteration, status))
        raise UsageError(f"--all would {action} {n} pairs of run {run_id} iteration {iteration}"
                         + (f" with status {status}" if status else "") + "; add --yes to do it")
    who = who or default_who()
    reviews = store.review_pairs(run_id, iteration, action, who, None if all_ else pair_ids, status=status, **change)
    if as_json:
        typer.echo(_strict_json({"action": action, "who": who, "run_id": run_id, "iteration": iteration,
                                 "pairs": reviews}, default=str))
        return
    typer.echo(f"{action}: {len(reviews)} pairs of run {run_id} iteration {iteration} by {who}")
    for r in reviews[:20]:
        typer.echo(f"  {r['pair_id']}  {r['status']}" + ("  swapped" if r["swapped"] else "")
                   + (f"  edited score {r['edited_score']}" if r["status"] == "edited" else "")
                   + (f"  note: {r['note']}" if r["note"] else ""))
    if len(reviews) > 20:
        typer.echo(f"  ... and {len(reviews) - 20} more")


def _status_command(action: str, doc: str) -> None:
    """Register `selfrat pairs ACTION` for accept, reject and swap: the same options, a different action."""

    @pairs_app.command(action, help=doc)
    @cli_command
    def command(ctx: typer.Context, run_id: RunOpt, iteration: IterationOpt, pair_ids: PairIds = None,
                status: StatusOpt = None, all_: AllOpt = False, yes: YesOpt = False, who: WhoOpt = None,
                note: NoteOpt = None, as_json: JsonOpt = False) -> None:
        _review(ctx, action, run_id, iteration, pair_ids, status, all_, yes, who, as_json, note=note)


_status_command("accept", "Keep pairs for training (status accepted).")
_status_command("reject", "Leave pairs out of training (status rejected).")
_status_command("swap", "Exchange chosen and rejected (status swapped; swapping back leaves the pair accepted).")


@pairs_app.command("edit")
@cli_command
def pairs_edit(ctx: typer.Context, run_id: RunOpt, iteration: IterationOpt, pair_ids: PairIds = None,
               rationale: Annotated[Optional[str], typer.Option(help="The chosen side's new rationale (without the "
                                                                     "score: training adds it).")] = None,
               score: Annotated[Optional[int], typer.Option(min=1, max=5, help="The chosen side's new score.")] = None,
               status: StatusOpt = None, all_: AllOpt = False, yes: YesOpt = False, who: WhoOpt = None,
               note: NoteOpt = None, as_json: JsonOpt = False) -> None:
    """Rewrite the chosen side (status edited): --rationale and/or --score; the part not given stays as it is."""
    _review(ctx, "edit", run_id, iteration, pair_ids, status, all_, yes, who, as_json, note=note,
            rationale=rationale, score=score)


@pairs_app.command("note")
@cli_command
def pairs_note(ctx: typer.Context, run_id: RunOpt, iteration: IterationOpt, pair_ids: PairIds = None,
               note: Annotated[str, typer.Option(help="The note kept with each pair (status unchanged).")] = ...,
               status: StatusOpt = None, all_: AllOpt = False, yes: YesOpt = False, who: WhoOpt = None,
               as_json: JsonOpt = False) -> None:
    """Leave a note on pairs; their status does not change."""
    _review(ctx, "note", run_id, iteration, pair_ids, status, all_, yes, who, as_json, note=note)


# ------------------------------------------------------------------ jobs: what the app's job panel does


@app.command("jobs")
@cli_command
def jobs_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """What is running in the workspace: run id, pid, stage and progress, start time (jobs the app launched,
    and `selfrat run/resume` processes started elsewhere)."""
    running = jobs.running(_ws(ctx).root)
    if as_json:
        keys = ("run_id", "pid", "launched", "started_at", "progress", "run_status", "argv", "log_path")
        typer.echo(_strict_json({"jobs": [{k: j.get(k) for k in keys} for j in running]}))
        return
    if not running:
        typer.echo("no jobs running")
    for j in running:
        p = j.get("progress") or {}
        where = (f"iteration {p['iteration']} {p['stage']}" + (f" {p['done']}/{p['total']}" if p.get("total") else "")
                 if p else "starting")
        typer.echo(f"{j['run_id']}  pid {j['pid']}  {where}  started {j['started_at']}"
                   + ("" if j["launched"] else "  (not launched by the app)"))


@app.command()
@cli_command
def cancel(ctx: typer.Context, run_id: Annotated[str, typer.Argument(help="Run id.")],
           timeout: Annotated[float, typer.Option(min=0, help="Seconds to wait before killing what is left.")] = 60,
           ) -> None:
    """Stop a run's job, as the app's Cancel button does: SIGTERM (the run stops where it is, marked cancelled;
    `selfrat resume RUN` continues it), SIGKILL to what is left after --timeout."""
    if jobs.cancel(_ws(ctx).root, run_id, timeout_s=timeout):
        typer.echo(f"cancelled {run_id}: `selfrat resume {run_id}` continues it")
    else:
        typer.echo(f"no job of {run_id} is running")


# ------------------------------------------------------------------ rationale quality: blinded side-by-side

sxs_app = typer.Typer(no_args_is_help=True, help="Blinded side-by-side of two systems' rationales: export a "
                                                 "sheet a person fills in, then score it.")
app.add_typer(sxs_app, name="sxs")


@sxs_app.command("export")
@cli_command
def sxs_export(
    ctx: typer.Context,
    first: Annotated[str, typer.Argument(help="System 1: RUN:ITERATION (or ITERATION with --run).")],
    second: Annotated[str, typer.Argument(help="System 2: RUN:ITERATION (or ITERATION with --run).")],
    dataset: Annotated[str, typer.Option(help="Dataset whose eval judgments are compared.")],
    out: Annotated[Path, typer.Option(help="The sheet (CSV) to write.")],
    key: Annotated[Optional[Path], typer.Option(help="The key (JSON); default OUT's name + .key.json.")] = None,
    run_id: Annotated[Optional[str], typer.Option("--run", help="Run of systems given as ITERATION alone.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the row order and the left/right coin.")] = 0,
    max_items: Annotated[Optional[int], typer.Option(min=1, help="A random N of the items both judged.")] = None,
) -> None:
    """Write a blinded sheet (left/right random per row) and the key that unblinds it. Keep the key from raters."""
    from engine.sxs import export_sheet, parse_spec

    a, b = parse_spec(first, run_id), parse_spec(second, run_id)
    res = export_sheet(_ws(ctx).store(), dataset, a, b, out, key, seed=seed, max_items=max_items)
    typer.echo(f"{res['rows']} rows ({a} vs {b} on {dataset}) -> {res['sheet']}; key -> {res['key']}"
               + (f"; {res['skipped']} items not judged by both" if res["skipped"] else ""))


@sxs_app.command("score")
@cli_command
def sxs_score(
    sheets: Annotated[list[Path], typer.Argument(help="Filled sheet(s) of one key: one per annotator.")],
    key: Annotated[Path, typer.Option(help="The key written by `sxs export`.")],
    seed: Annotated[int, typer.Option(help="Bootstrap seed of the 95% interval.")] = 0,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Win rate of each system (ties count half, and are reported) with a 95% bootstrap interval over items."""
    from engine.sxs import score_sheets

    res = score_sheets(sheets, key, seed=seed)
    if as_json:
        typer.echo(_strict_json(res))
        return
    typer.echo(f"{res['dataset']}: {res['annotations']} annotations of {res['items']} items"
               f" ({res['ties']} ties, {res['unfilled']} rows not filled)")
    for s in res["systems"]:
        typer.echo(f"  {s['system']}: win rate {_fmt(s['win_rate'])} [{_fmt(s['win_rate_lo'])},"
                   f" {_fmt(s['win_rate_hi'])}]  wins {s['wins']} losses {s['losses']}"
                   f"  decisive {_fmt(s['decisive_win_rate'])}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
