"""bench/replicate.py on a tiny stored workspace: the held-out filter, the run driver (stage timings), the
tables (each judge; paired differences) and the diagnostics, with a scripted judge (FakeSampler) and the
training stages marked done beforehand (no model is loaded or trained), so it runs in seconds."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SIZES = {"sft_items": 3, "sft_epochs": 1.0, "sft_lr": 1e-4, "items_per_iteration": 3, "n": 3, "pairs_per_item": 2,
         "min_margin": 1, "dpo_lr": 1e-5, "max_new_tokens": 40, "cia_items": 8, "rb_items": 3, "eval_new_tokens": 40,
         "baseline_n": 2, "meta_new_tokens": 8, "max_length": 1024, "bootstrap": 50, "compare_bootstrap": 50,
         "relative": True, "selection": "spread"}
SHARED_ROWS = (3, 4)  # rows of the train file copied into the held-out file: their items must be dropped


@pytest.fixture(scope="module")
def rep():
    spec = importlib.util.spec_from_file_location("bench_replicate", ROOT / "bench" / "replicate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_replicate"] = module
    spec.loader.exec_module(module)
    return module


def _tsv_rows(path: Path) -> tuple[list[str], list[dict]]:
    csv.field_size_limit(sys.maxsize)
    with path.open(newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        return list(reader.fieldnames), list(reader)


def _write_tsv(path: Path, fields: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, delimiter="\t")
        w.writeheader()
        w.writerows(rows)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A small copy of the shared files: 24 train prompts; 12 held-out prompts plus 2 of the train prompts;
    the first 40 pairs of each RewardBench set."""
    shared = ROOT.parent / "shared" / "data"
    if not shared.is_dir():
        pytest.skip(f"reference data not found at {shared}")
    out = tmp_path_factory.mktemp("data")
    fields, train = _tsv_rows(shared / "cia" / "scored_responses_testset_remaining.tsv")
    _write_tsv(out / "cia" / "scored_responses_testset_remaining.tsv", fields, train[:24])
    hfields, held = _tsv_rows(shared / "cia" / "scored_responses_testset_biggen.tsv")
    _write_tsv(out / "cia" / "scored_responses_testset_biggen.tsv", hfields,
               held[:12] + [{k: train[i - 1][k] for k in hfields} for i in SHARED_ROWS])
    for name in ("Chat", "Chat_Hard"):
        lines = (shared / "rewardbench" / f"{name}.jsonl").read_text().splitlines()[:40]
        (out / "rewardbench").mkdir(exist_ok=True)
        (out / "rewardbench" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
    return out


def _script(golds: dict[str, int]):
    """Iteration 2 ("fake/it2") hits every CIA gold score; otherwise (and for A/B verdicts and meta-judge
    ratings) a judge answers by a hash of the model, the prompt and the sample."""

    def script(messages, index, seed, model):
        prompt = messages[-1]["content"]
        h = int(hashlib.md5(f"{model}{prompt}{index}".encode()).hexdigest(), 16)
        if "Response A" in prompt:
            return f"Compared. [RESULT] {'AB'[h % 2]}"
        gold = next((g for r, g in golds.items() if r in prompt), None)
        if model == "fake/it2" and gold is not None:
            return f"Exactly right. [RESULT] {gold}"
        return f"Feedback {index}. [RESULT] {1 + h % 5}"
    return script


@pytest.fixture(scope="module")
def built(rep, data, tmp_path_factory):
    """A workspace prepared by the script (import, filter, run), its training stages marked done with stand-in
    checkpoints, then driven through `run_experiment` with a scripted judge."""
    from engine.iteration import Runner, create_run, single_stage_config
    from engine.sampling import FakeSampler
    from engine.workspace import Workspace

    root = tmp_path_factory.mktemp("rep")
    ws = Workspace.open(root / "ws")
    clock = rep.Timings(ws.root / rep.TIMINGS_FILE)
    setup = rep.prepare(ws, data, dict(SIZES), "test", "some-org/judge", clock)
    store = ws.store()
    golds = {it["response"]: int(round(it["gold_score"])) for d in ("cia-heldout", "cia-train", "cia-sft")
             for it in store.items(d).iter_rows(named=True)}
    script = _script(golds)
    dpo = {"train/loss": 0.69, "train/rewards/margins": 0.01, "train/rewards/accuracies": 0.5,
           "train/rewards/chosen": 0.0, "train/rewards/rejected": -0.01, "train/steps": 2.0, "train/runtime_s": 3.0,
           "train/pairs": 4}
    for k, ckpt, metrics in ((0, "fake/sft", {"sft/loss": 1.5, "sft/final_loss": 1.2, "sft/steps": 1.0,
                                                "sft/runtime_s": 2.0, "sft/examples": 3.0}),
                             (1, "fake/it1", dpo), (2, "fake/it2", dpo)):
        store.ensure_iteration(rep.RUN_ID, k)
        store.set_stage(rep.RUN_ID, k, "train", "done", checkpoint=ckpt, report=metrics)
    run_dir = Path(store.run(rep.RUN_ID)["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "run.log").open("a") as f:  # what a real DPO stage logs, for the per-step parser
        f.write("2025-01-01T00:00:00 [iter 1] train: DPO on 4 pairs (policy p, reference r)\n"
                "2025-01-01T00:00:01 step 1/2 loss=0.6931 margin=0.0000\n"
                "2025-01-01T00:00:02 step 2/2 loss=0.6900 margin=0.0125\n")
    create_run(ws, single_stage_config(Runner(ws, rep.RUN_ID, echo=False).cfg, "fake/sft"), rep.SINGLE)
    store.ensure_iteration(rep.SINGLE, 1)
    store.set_stage(rep.SINGLE, 1, "train", "done", checkpoint="fake/ss", report=dpo)

    def factory(path):
        return FakeSampler(lambda m, i, s: script(m, i, s, path), model_name=path)

    rep.run_experiment(ws, clock, sampler_factory=factory, echo=False)
    return rep, ws, setup, clock, data


def test_held_out_filter_drops_every_item_whose_prompt_is_in_the_train_file(rep, data, built):
    _, ws, setup, _, _ = built
    store = ws.store()
    train = rep.read_file(data, "train", "x").items
    train_keys = set(rep._keys(train))
    shared = [rep.prompt_key(r["instruction"], r["input"]) for r in train.iter_rows(named=True)
              if r["source_row"] in SHARED_ROWS]
    info = setup["datasets"]["cia-heldout"]
    assert info["dropped_prompts"] == len(SHARED_ROWS) and info["dropped_shared_prompt"] == len(shared) >= 8
    held = store.items("cia-heldout")
    assert held.height == SIZES["cia_items"] and not set(rep._keys(held)) & train_keys
    # spread: one response per prompt while prompts last, gold rotating over 1..5
    assert held["instruction"].n_unique() == SIZES["cia_items"]
    assert held["gold_score"].round().n_unique() == 5
    # SFT and loop items come from disjoint rows of the train file: no prompt in common
    sft, loop = store.items("cia-sft"), store.items("cia-train")
    assert sft.height == SIZES["sft_items"] and loop.height == 2 * SIZES["items_per_iteration"]
    assert not set(rep._keys(sft)) & set(rep._keys(loop))
    assert store.items("rb-chat").height == store.items("rb-chat-hard").height == SIZES["rb_items"]
    # the filter alone, on a frame
    kept, dropped, prompts = rep.drop_shared_prompts(train.head(10), set(shared))
    assert dropped == sum(1 for k in rep._keys(train.head(10)) if k in set(shared)) and prompts <= 2
    assert kept.height == 10 - dropped


@pytest.fixture(scope="module")
def reported(built, tmp_path_factory):
    """The script's report of the built workspace: (summary, replicate.json, replicate.md)."""
    rep, ws, setup, clock, data = built
    out = tmp_path_factory.mktemp("out")
    summary = rep.report(ws, out, setup, clock, "test", data, 1.0, with_machine=False)
    return summary, json.loads((out / "replicate.json").read_text()), (out / "replicate.md").read_text()


def test_paired_table_has_every_comparison_and_marks_intervals(built, reported):
    rep = built[0]
    summary, full, md = reported
    records = full["table2"]
    pairs = {(r["b"], r["a"]) for r in records}
    others = [j[0] for j in rep.JUDGES if not j[0].startswith("iteration")]
    assert pairs == {(b, a) for b in ("iteration 1", "iteration 2") for a in others} | {("iteration 2", "iteration 1")}
    keys = {f"{d}:{'relative' if ab else 'absolute'}:{m}" for _, d, m, ab in rep.PAIRED}
    for r in records:
        assert set(r["cells"]) == keys
        has_ab = r["a"] in ("J_SFT (seed, greedy)", "single-stage DPO", "iteration 1")
        for key, cell in r["cells"].items():
            if ":relative:" in key and not has_ab:
                assert cell is None
                continue
            assert cell is not None, (r["b"], r["a"], key)
            assert set(cell) == {"a", "b", "delta", "lo", "hi", "p", "n", "excludes_0"}
            assert cell["n"] == (SIZES["cia_items"] if key.startswith("cia") else SIZES["rb_items"])
    it2 = next(r for r in records if r["b"] == "iteration 2" and r["a"] == "J_SFT (seed, greedy)")
    exact = it2["cells"]["cia-heldout:absolute:exact"]
    assert exact["b"] == 1.0 and exact["delta"] > 0  # the scripted iteration 2 hits every gold score
    table = md.split("## Table 2")[1].split("## Diagnostics")[0]
    assert "| iteration 2 | iteration 1 |" in table
    assert sum(line.startswith("| iteration ") for line in table.splitlines()) == len(records)
    assert summary["status"] == "done" and summary["paired_vs_J_SFT"]
    json.dumps(summary)


def test_judge_table_diagnostics_timings_and_projection(built, reported):
    rep, ws, _, clock, data = built
    _, full, md = reported
    records = full["table1"]
    assert [r["judge"] for r in records] == [j[0] for j in rep.JUDGES]
    by = {r["judge"]: r["figures"] for r in records}
    assert by["iteration 2"]["cia-heldout:exact"]["value"] == 1.0
    assert by["iteration 2"]["cia-heldout:pearson"]["n"] == SIZES["cia_items"]
    ab = by["J_SFT (seed, greedy)"]["rb-chat:relative/accuracy"]
    assert ab["n"] == SIZES["rb_items"] and ab["lo"] <= ab["value"] <= ab["hi"]  # an interval computed here
    assert by["raw model (before SFT)"]["cia-heldout:pearson"]["value"] is not None
    assert by["single-stage DPO"]["rb-chat:accuracy"]["value"] is not None
    assert by["self-consistency, mean of N"]["rb-chat:relative/accuracy"]["value"] is None  # no A/B judgments

    diag = full["diagnostics"]
    it1 = diag[rep.RUN_ID]["1"]
    assert it1["curation"]["pairs"] >= 0 and "items_over_cap" in it1["curation"]
    assert it1["steps"] == [{"step": 1, "steps": 2, "loss": 0.6931, "margin": 0.0},
                            {"step": 2, "steps": 2, "loss": 0.69, "margin": 0.0125}]
    assert it1["train_samples"]["n"] == SIZES["items_per_iteration"] * SIZES["n"]
    assert set(it1["train_samples"]["share"]) == {"1", "2", "3", "4", "5"}
    assert diag[rep.RUN_ID]["2"]["eval_cia"]["n"] == SIZES["cia_items"]
    assert "mean_entropy" in diag[rep.RUN_ID]["2"]["eval_cia"] and "1" in diag[rep.SINGLE]
    for part in ("Table 1", "Table 2", "Diagnostics", "Wall time per stage", "dropped for a prompt shared",
                 "per step (loss, margin)"):
        assert part in md, part

    for key in ("0:evaluate", "0:evaluate:baseline", "0:evaluate:meta-judge", "0:evaluate:raw",
                "1:sample", "1:curate", "2:evaluate"):
        assert clock.get(rep.RUN_ID, key) is not None, key
    assert clock.get(rep.SINGLE, "1:sample") is not None
    assert clock.get(rep.RUN_ID, "0:train") is None  # done before this session: a stage found done adds nothing

    # the projection works from this workspace's (scripted: zero) costs at sizes its data allow
    proj = rep.project(full["costs"], data, SIZES)
    assert proj["total_s"] >= 0 and "iteration 2 sample" in proj["stages_s"]
    assert proj["judgments"]["abs_requests"] == SIZES["cia_items"] + 2 * 2 * SIZES["rb_items"]


def test_fresh_start_on_a_used_workspace_is_refused(built, capsys):
    rep, ws, _, _, data = built
    with pytest.raises(SystemExit) as e:
        rep.main(["--workspace", str(ws.root), "--out", str(ws.root / "out"), "--data", str(data)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "already holds a replication run" in err and "--resume" in err
    with pytest.raises(SystemExit) as e:
        rep.main(["--resume", "--workspace", str(ws.root / "elsewhere"), "--data", str(data)])
    assert e.value.code == 2 and "nothing to resume" in capsys.readouterr().err


def test_expected_pairs_matches_the_gold_curation_rule(rep):
    # one sample cannot give a pair; certain hits and misses split n samples into pairs up to the cap
    assert rep.expected_pairs(1, 2, 0.5, 0.5) == 0
    assert rep.expected_pairs(4, 2, 0.5, 0.5) == pytest.approx(
        sum(__import__("math").comb(4, m) * 0.5**4 * min(2, m, 4 - m) for m in range(5)))
    assert rep.expected_pairs(4, 1, 1.0, 0.0) == 0


def test_follow_up_changes_one_size_from_the_same_seed_and_is_reported_beside_the_first_run(built, tmp_path,
                                                                                               capsys):
    import shutil

    from engine.iteration import create_run
    from engine.sampling import FakeSampler
    from engine.workspace import Workspace

    rep, ws, _, _, data = built
    root = tmp_path / "ws"
    shutil.copytree(ws.root, root)  # the module's workspace stays as the other tests read it
    copy_ws = Workspace.open(root)
    store = copy_ws.store()
    argv = ["--follow-up", "--workspace", str(root), "--out", str(tmp_path / "out"), "--data", str(data)]

    with pytest.raises(SystemExit) as e:
        rep.main([*argv, "--resume", "--dpo-lr", "1e-4"])
    assert e.value.code == 2 and "without --resume" in capsys.readouterr().err
    # a change that would judge other items is refused, and nothing is stored
    with pytest.raises(SystemExit) as e:
        rep.main([*argv, "--cia-items", "5"])
    assert e.value.code == 2 and "not cia_items" in capsys.readouterr().err
    assert "follow_up" not in json.loads((root / rep.SETUP_FILE).read_text())
    assert rep.FOLLOW not in rep.runs_in(store)
    with pytest.raises(SystemExit) as e:  # the first run's train slices cover 2 iterations
        rep.main([*argv, "--dpo-lr", "1e-4", "--follow-up-iterations", "3"])
    assert e.value.code == 2 and "1 to 2 iterations" in capsys.readouterr().err

    # the follow-up: the first run's config with only the change, from its J_SFT, without seed stages
    first = store.run(rep.RUN_ID)["config"]
    cfg = rep.follow_up_config(store, {"dpo_lr": 1e-4}, 2).model_dump(mode="json")
    assert cfg["training"]["learning_rate"] == 1e-4 and cfg["model"] == "fake/sft" and cfg["sft"] is None
    assert cfg["evaluation"]["baselines"] == [] and not cfg["evaluate_initial"]
    for section in ("sampling", "curation", "train_items_per_iteration", "train_dataset", "eval_datasets"):
        assert cfg[section] == first[section], section
    assert {k: v for k, v in cfg["training"].items() if k != "learning_rate"} == \
        {k: v for k, v in first["training"].items() if k != "learning_rate"}
    # the follow-up the diagnostics point to next: DPO plus NLL on the chosen judgment, nothing else changed
    loss = rep.follow_up_config(store, {"dpo_loss": "sigmoid+sft"}, 2).model_dump(mode="json")
    assert first["training"]["loss"] == "sigmoid" and loss["training"]["loss"] == "sigmoid+sft"
    assert {k: v for k, v in loss["training"].items() if k != "loss"} == \
        {k: v for k, v in first["training"].items() if k != "loss"}
    assert rep.follow_up_label({"dpo_loss": "sigmoid+sft"}) == "dpo_loss sigmoid+sft"

    # its trainings stand in (no model is trained here), as in `built`; main() writes the setup and runs it
    create_run(copy_ws, rep.follow_up_config(store, {"dpo_lr": 1e-4}, 2), rep.FOLLOW)
    for k in (1, 2):
        store.ensure_iteration(rep.FOLLOW, k)
        store.set_stage(rep.FOLLOW, k, "train", "done", checkpoint=f"fake/follow{k}", report={"train/pairs": 1})
    golds = {it["response"]: int(round(it["gold_score"])) for d in ("cia-heldout", "cia-train", "cia-sft")
             for it in store.items(d).iter_rows(named=True)}
    script = _script(golds)
    summary = rep.main([*argv, "--dpo-lr", "1e-4"], sampler_factory=lambda path: FakeSampler(
        lambda m, i, s: script(m, i, s, path), model_name=path))
    assert json.loads((root / rep.SETUP_FILE).read_text())["follow_up"] == {"changes": {"dpo_lr": 1e-4},
                                                                             "iterations": 2}
    assert store.run_status(rep.FOLLOW)["status"] == "done"
    assert set(summary["judges"]) >= {"follow-up iteration 1 (dpo_lr 0.0001)", "follow-up iteration 2 (dpo_lr 0.0001)"}

    # iteration 1 samples with the same judge, seed and items as the first run's: the same judgments and pairs;
    # iteration 2 samples with another judge (its scripted scores follow the model)
    full = json.loads((tmp_path / "out" / "replicate.json").read_text())
    same1 = full["diagnostics"][rep.FOLLOW]["1"]["same_as_first_run"]
    assert same1["judgments"] == same1["judgments_of"] == SIZES["items_per_iteration"] * SIZES["n"]
    assert same1["pairs"] == same1["pairs_of"] == len(store.pairs(rep.RUN_ID, 1))
    same2 = full["diagnostics"][rep.FOLLOW]["2"]["same_as_first_run"]
    assert same2["judgments"] < same2["judgments_of"]  # a scripted text differs only in its score: some agree

    label = "follow-up iteration {} (dpo_lr 0.0001)"
    plan = {(r["b"], r["a"]) for r in full["table2"] if r["b"].startswith("follow-up")}
    assert plan == {(label.format(1), "J_SFT (seed, greedy)"), (label.format(1), "iteration 1"),
                    (label.format(2), "J_SFT (seed, greedy)"), (label.format(2), "iteration 2"),
                    (label.format(2), label.format(1))}
    for r in full["table2"]:
        if r["b"].startswith("follow-up"):
            assert r["cells"]["cia-heldout:absolute:pearson"]["n"] == SIZES["cia_items"]
            assert r["cells"]["rb-chat:relative:accuracy"]["n"] == SIZES["rb_items"]
    md = (tmp_path / "out" / "replicate.md").read_text()
    assert "Follow-up run (`replicate-follow-up`)" in md and "| follow-up iteration 2 evaluate |" in md

    # a second, different follow-up in the same workspace is refused
    with pytest.raises(SystemExit) as e:
        rep.main([*argv, "--dpo-lr", "5e-5"])
    assert e.value.code == 2 and "holds a follow-up already" in capsys.readouterr().err
