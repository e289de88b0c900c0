"""Launch: a new run, or the next iteration of a selected run, started as a separate `selfrat` process.

Like LLaMA-Factory's runner, in fixed steps: read the form, validate it with `RunConfig` (each bad field
named, nothing launched on error), show the exact command (engine.jobs' own dry run of the launch), then
`engine.jobs` starts the CLI. Above the
launch button, a what-if preview runs the form's curation settings on the selected run's latest sampled
iteration (writing nothing).

Training: the method (dpo, or grpo with its generations, prompts per step, steps, completion budget, beta,
learning rate and reward weights; a GRPO run may train on a pairwise dataset too).

Hardware: backend (vllm offered only where it is installed), device, tensor parallel size, the training
strategy and its processes, LoRA / QLoRA, precision and trackers. The form is validated against this machine
(`RunConfig` with its GPU count, from `nvidia-smi -L`: the app never imports torch), so vllm or QLoRA without a
GPU, zero3 with one process or more processes than GPUs are named per field before anything launches.
"""

from __future__ import annotations

import importlib.util
import shlex

import plotly.express as px
import polars as pl
import streamlit as st
import yaml
from pydantic import ValidationError

from engine import jobs
from engine.config import HUB_ID, ConfigError, CurationConfig, RunConfig, SamplingConfig, TrainingConfig
from engine.curation import preview
from engine.demo import demo_config
from engine.devices import gpu_count
from engine.distributed import accelerate_config, launch_argv
from engine.rewards import NAMES as REWARD_NAMES
from store import Store, StoreError, queries
from ui import components, state

EMBEDDED = "embedded"
MODEL_SOURCES = ("embedded", "workspace checkpoint", "hub id")
# Same rule as engine.models (not imported: it pulls in torch): org/name, no leading '.' or '-'.
LAUNCHED_KEY = "launched_run"

st.title("Launch")
ws = state.workspace_path()


def checkpoints() -> list[str]:
    """Checkpoint dirs the workspace's runs trained (runs/<id>/checkpoints/iter-k holding a config.json)."""
    found = [p for p in ws.glob("runs/*/checkpoints/iter-*") if (p / "config.json").is_file()]
    return [str(p.relative_to(ws)) for p in sorted(found)]


def model_spec(source: str, picked: str | None, typed: str) -> tuple[str | None, str | None]:
    """(model value for RunConfig, error)."""
    if source == "embedded":
        return EMBEDDED, None
    if source == "workspace checkpoint":
        if not picked:
            return None, "model: this workspace has no trained checkpoint yet; pick embedded or a hub id"
        path = (ws / picked).resolve()
        if not path.is_relative_to(ws) or not path.is_dir():  # only what the list offered: inside the workspace
            return None, f"model: {picked!r} is not a checkpoint directory inside the workspace"
        return str(path), None
    typed = (typed or "").strip()
    if typed == EMBEDDED or HUB_ID.match(typed):
        return typed, None
    return None, f"model: {typed!r} is neither 'embedded' nor a hub id like org/name"


SINGLE = "one process"
STRATEGIES = (SINGLE, "ddp", "fsdp", "zero3")
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


def vllm_installed() -> bool:
    """Whether backend vllm can be offered: looked up without importing it (engine.vllm_sampler's
    `vllm_available` says the same, but that module imports torch, which the app never does)."""
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def with_current(options: list[str], current: str) -> list[str]:
    """`options`, plus the config's own value when the form does not offer it (e.g. cuda:1, mps)."""
    return options if current in options else [*options, current]


def field_errors(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        out.append(f"{where}: {'unknown key' if e['type'] == 'extra_forbidden' else e['msg']}")
    return out


# ------------------------------------------------------------------ mode and the selected run

run_ids = state.cached(queries.runs_overview)["run_id"].to_list()
selected = state.run_picker() if run_ids else None
# Stable option values (the run's name only in the label), so picking another run keeps the mode.
modes = ["new", "next"] if selected else ["new"]
mode = st.radio("Launch", modes, horizontal=True, key="l_mode",
                format_func=lambda m: "New run" if m == "new" else f"Next iteration of {selected}")
next_mode = mode == "next"

datasets = state.cached(Store.datasets)
absolute_train = datasets.filter((pl.col("kind") == "absolute") & (pl.col("train") > 0))["name"].to_list()
# GRPO trains on pairwise items too (verdict and consistency rewards); DPO is refused on them below.
pairwise_train = datasets.filter((pl.col("kind") == "pairwise") & (pl.col("train") > 0))["name"].to_list()
train_names = absolute_train + pairwise_train
all_names = datasets["name"].to_list()

if next_mode:
    stored = state.cached(Store.run, selected)["config"]
    base = dict(stored)
    prefix = f"next_{selected}"
else:
    base = demo_config()
    base["train_dataset"] = base["train_dataset"] if base["train_dataset"] in absolute_train else (
        absolute_train[0] if absolute_train else None)
    base["eval_datasets"] = [d for d in base["eval_datasets"] if d in all_names]
    prefix = "new"
# Typed defaults for the widgets, section by section (a new run may not have a train dataset to validate yet).
samp = SamplingConfig.model_validate(base.get("sampling") or {})
cur_default = CurationConfig.model_validate(base.get("curation") or {})
trn = TrainingConfig.model_validate(base.get("training") or {})
if st.session_state.get("l_run_id_default") is None:
    st.session_state["l_run_id_default"] = state.workspace().new_run_id("run")


def k(name: str) -> str:
    # Widget keys per mode/run, so the form pre-fills from the right config when either changes.
    return f"l_{prefix}_{name}"


GPUS = gpu_count()

# ------------------------------------------------------------------ the form

with st.form("launch_form"):
    if next_mode:
        st.markdown(f"Continue **{selected}** (model `{stored['model']}`, train `{stored.get('train_dataset')}`,"
                    f" eval {stored.get('eval_datasets')}): model and datasets stay; the settings below apply"
                    " to the iterations still to run.")
        run_id = selected
    else:
        c = st.columns([1, 1, 2])
        run_id = c[0].text_input("Run id", value=st.session_state["l_run_id_default"], key=k("run_id"))
        source = c[1].radio("Model", MODEL_SOURCES, key=k("model_source"))
        ckpts = checkpoints()
        with c[2]:
            picked = st.selectbox("Workspace checkpoint", ckpts, key=k("checkpoint"),
                                  placeholder="no checkpoints yet" if not ckpts else "pick one")
            typed = st.text_input("Hub id", key=k("hub_id"), placeholder="org/name")
        c = st.columns(4)
        train_dataset = c[0].selectbox("Train dataset", train_names, key=k("train_dataset"),
                                       index=train_names.index(base["train_dataset"])
                                       if base.get("train_dataset") in train_names else None,
                                       help="Absolute datasets; pairwise ones with training method grpo only.")
        eval_datasets = c[1].multiselect("Eval datasets", all_names, default=base["eval_datasets"],
                                         key=k("eval_datasets"))
        max_train = c[2].number_input("Train items (0 = all)", value=int(base.get("max_train_items") or 0),
                                      step=1, key=k("max_train"))
        max_eval = c[3].number_input("Eval items per dataset (0 = all)",
                                     value=int(base.get("max_eval_items") or 0), step=1, key=k("max_eval"))
        base_sft = base.get("sft") or {}
        c = st.columns([1, 1, 2])
        sft_on = c[0].checkbox("Seed SFT first", value=bool(base_sft), key=k("sft_on"),
                               help="SFT the model on gold rationales (J_SFT) before the loop; the raw model is "
                               "evaluated beside it (baseline `raw`).")
        sft_dataset = c[1].selectbox("SFT dataset", absolute_train, key=k("sft_dataset"), disabled=not sft_on,
                                     index=absolute_train.index(base_sft["dataset"])
                                     if base_sft.get("dataset") in absolute_train else None)
        sft_items = c[2].number_input("SFT items (0 = all)", value=int(base_sft.get("max_items") or 0), step=1,
                                      key=k("sft_items"), disabled=not sft_on)

    st.markdown("**Sampling**")
    c = st.columns(5)
    n = c[0].number_input("N per item", value=samp.n, step=1, key=k("n"))
    temperature = c[1].number_input("Temperature", value=float(samp.temperature), step=0.1,
                                    key=k("temperature"))
    top_p = c[2].number_input("Top p", value=float(samp.top_p), step=0.05, key=k("top_p"))
    max_new_tokens = c[3].number_input("Max new tokens", value=samp.max_new_tokens, step=16,
                                       key=k("max_new_tokens"))
    force_score = c[4].checkbox("Force a score", value=samp.force_score is not False,
                                key=k("force_score"), help="Close a rationale without a score with ' [RESULT] '"
                                " and draw the score from the model's 1-5 distribution.")
    st.markdown("**Curation**")
    c = st.columns(4)
    strategies = list(CurationConfig.model_fields["strategy"].annotation.__args__)
    strategy = c[0].selectbox("Strategy", strategies, index=strategies.index(cur_default.strategy),
                              key=k("strategy"), help=CurationConfig.model_fields["strategy"].description)
    min_margin = c[1].number_input("Min margin", value=cur_default.min_margin, step=1, key=k("min_margin"),
                                   help=CurationConfig.model_fields["min_margin"].description)
    max_pairs = c[2].number_input("Max pairs per item", value=cur_default.max_pairs_per_item, step=1,
                                  key=k("max_pairs"))
    meta_tokens = c[3].number_input("Meta-judge note tokens", value=cur_default.meta_max_new_tokens, step=16,
                                    key=k("meta_tokens"), help="meta only: "
                                    + CurationConfig.model_fields["meta_max_new_tokens"].description)
    c = st.columns(4)
    use_forced = c[0].checkbox("Use forced scores", value=cur_default.use_forced, key=k("use_forced"),
                               help=CurationConfig.model_fields["use_forced"].description)
    dedupe = c[1].checkbox("Dedupe identical texts", value=cur_default.dedupe, key=k("dedupe"),
                           help=CurationConfig.model_fields["dedupe"].description)
    balance = c[2].checkbox("Balance chosen scores", value=cur_default.balance_scores, key=k("balance"),
                            help=CurationConfig.model_fields["balance_scores"].description)
    st.markdown("**Training**")
    methods = list(TrainingConfig.model_fields["method"].annotation.__args__)
    grpo = trn.grpo
    c = st.columns(5)
    method = c[0].selectbox("Method", methods, index=methods.index(trn.method), key=k("method"),
                            help=TrainingConfig.model_fields["method"].description)
    grpo_generations = c[1].number_input("GRPO generations per prompt", value=grpo.num_generations, step=1,
                                         key=k("grpo_generations"),
                                         help=type(grpo).model_fields["num_generations"].description)
    grpo_prompts = c[2].number_input("GRPO prompts per step", value=grpo.prompts_per_step, step=1,
                                     key=k("grpo_prompts"),
                                     help=type(grpo).model_fields["prompts_per_step"].description)
    grpo_steps = c[3].number_input("GRPO steps (0 = epochs)", value=int(grpo.max_steps or 0), step=1,
                                   key=k("grpo_steps"), help=type(grpo).model_fields["max_steps"].description)
    grpo_tokens = c[4].number_input("GRPO completion tokens", value=grpo.max_completion_length, step=16,
                                    key=k("grpo_tokens"),
                                    help=type(grpo).model_fields["max_completion_length"].description)
    c = st.columns(2 + len(REWARD_NAMES))
    grpo_beta = c[0].number_input("GRPO beta (KL)", value=float(grpo.beta), step=0.01, format="%.3f",
                                  key=k("grpo_beta"), help=type(grpo).model_fields["beta"].description)
    grpo_lr = c[1].number_input("GRPO learning rate (0 = below)", value=float(grpo.learning_rate or 0.0),
                                format="%.2e", step=1e-6, key=k("grpo_lr"),
                                help=type(grpo).model_fields["learning_rate"].description)
    grpo_weights = {name: col.number_input(f"Reward weight: {name}", value=float(getattr(grpo.rewards, name)),
                                           step=0.1, key=k(f"grpo_w_{name}"),
                                           help=type(grpo.rewards).model_fields[name].description)
                    for col, name in zip(c[2:], REWARD_NAMES)}
    c = st.columns(5)
    beta = c[0].number_input("Beta", value=float(trn.beta), step=0.05, format="%.3f", key=k("beta"))
    lr = c[1].number_input("Learning rate", value=float(trn.learning_rate), format="%.2e",
                           step=1e-6, key=k("lr"))
    epochs = c[2].number_input("Epochs", value=float(trn.epochs), step=1.0, key=k("epochs"))
    lora = c[3].checkbox("LoRA", value=trn.lora, key=k("lora"))
    iterations = None if next_mode else c[4].number_input("Iterations", value=int(base.get("iterations", 1)), step=1,
                                                            key=k("iterations"))
    st.markdown(f"**Hardware** · this machine: {GPUS} CUDA GPU{'s' if GPUS != 1 else ''} (`nvidia-smi -L`)")
    c = st.columns(4)
    backends = with_current(["transformers", "vllm"] if vllm_installed() else ["transformers"], samp.backend)
    backend = c[0].selectbox("Sampling backend", backends, index=backends.index(samp.backend), key=k("backend"),
                             help="vllm: GPU only, offered when the vllm package is installed (the `gpu` extra).")
    devices = with_current(["auto", "cpu", "cuda"], samp.device)
    device = c[1].selectbox("Device", devices, index=devices.index(samp.device), key=k("device"),
                            help="Where sampling, evaluation and training run: auto = cuda when a GPU is visible.")
    tp = c[2].number_input("Tensor parallel size (vllm)", value=int(samp.vllm.tensor_parallel_size), step=1,
                           key=k("tp"), help=type(samp.vllm).model_fields["tensor_parallel_size"].description)
    precisions = list(TrainingConfig.model_fields["precision"].annotation.__args__)
    precision = c[3].selectbox("Precision", precisions, index=precisions.index(trn.precision), key=k("precision"),
                               help="Sampling and training: " + TrainingConfig.model_fields["precision"].description)
    c = st.columns(4)
    dist = trn.distributed
    train_strategy = c[0].selectbox("Training strategy", STRATEGIES,
                              index=STRATEGIES.index(dist.strategy if dist else SINGLE), key=k("strategy_dist"),
                              help="ddp: a copy per process (CPU or one GPU each); fsdp / zero3: sharded over "
                              "GPUs (zero3 needs deepspeed).")
    processes = c[1].number_input("Processes", value=int(dist.num_processes if dist else 2), step=1,
                                  key=k("processes"), help="ddp / fsdp / zero3: one per GPU on cuda.")
    qlora = c[2].checkbox("QLoRA (4-bit)", value=trn.quantization == "4bit", key=k("qlora"),
                          help=TrainingConfig.model_fields["quantization"].description)
    tracking = c[3].multiselect("Tracking", TRACKERS, default=[t for t in trn.report_to if t != "none"],
                                key=k("report_to"), help=TrainingConfig.model_fields["report_to"].description)
    b = st.columns([1, 1, 4])
    b[0].form_submit_button("Check")
    launch_clicked = b[1].form_submit_button("Launch", type="primary")

# ------------------------------------------------------------------ validate

errors: list[str] = []
raw = {**base}
raw["sampling"] = {**base.get("sampling", {}), "n": n, "temperature": temperature, "top_p": top_p,
                   "max_new_tokens": max_new_tokens, "force_score": force_score, "backend": backend,
                   "device": device, "vllm": {**(base.get("sampling") or {}).get("vllm", {}),
                                              "tensor_parallel_size": tp}}
if "precision" in SamplingConfig.model_fields:
    raw["sampling"]["precision"] = precision
raw["curation"] = {**base.get("curation", {}), "strategy": strategy, "min_margin": min_margin,
                   "max_pairs_per_item": max_pairs, "meta_max_new_tokens": meta_tokens, "use_forced": use_forced,
                   "dedupe": dedupe, "balance_scores": balance}
raw["training"] = {**base.get("training", {}), "beta": beta, "learning_rate": lr, "epochs": epochs,
                   "lora": lora or qlora, "quantization": "4bit" if qlora else None, "precision": precision,
                   "report_to": tracking or ["none"], "method": method,
                   "grpo": {**((base.get("training") or {}).get("grpo") or {}), "num_generations": grpo_generations,
                            "prompts_per_step": grpo_prompts, "max_steps": int(grpo_steps) or None,
                            "max_completion_length": grpo_tokens, "beta": grpo_beta,
                            "learning_rate": grpo_lr or None, "rewards": grpo_weights},
                   "distributed": None if train_strategy == SINGLE else {
                       **((base.get("training") or {}).get("distributed") or {}), "strategy": train_strategy,
                       "num_processes": processes}}
if not next_mode:
    model, model_error = model_spec(source, picked, typed)
    if model_error:
        errors.append(model_error)
    raw.update(model=model or EMBEDDED, train_dataset=train_dataset, eval_datasets=eval_datasets,
               iterations=iterations, max_train_items=int(max_train) or None, max_eval_items=int(max_eval) or None)
    baselines = [b for b in (raw.get("evaluation") or {}).get("baselines", []) if b != "raw"]
    raw["sft"] = {**base_sft, "dataset": sft_dataset, "max_items": int(sft_items) or None} if sft_on else None
    raw["evaluation"] = {**(raw.get("evaluation") or {}), "baselines": baselines + (["raw"] if sft_on else [])}
    if train_dataset in pairwise_train and method != "grpo":
        errors.append(f"train_dataset: {train_dataset!r} holds pairwise items; DPO samples absolute judgments "
                      "(training method grpo trains on pairwise items)")
    try:
        jobs.check_run_id(run_id)
        if run_id in run_ids:
            errors.append(f"run id: {run_id!r} exists already; pick it above to continue it instead")
    except ConfigError as e:
        errors.append(str(e))
if backend == "vllm" and not vllm_installed():
    errors.append("sampling.backend: vllm is not installed here (pip install -e '.[gpu]' on a CUDA machine)")
cfg = None
try:
    # against this machine: its GPU count decides device auto, vllm / QLoRA without a GPU, processes per GPU
    cfg = RunConfig.model_validate(raw, context={"gpus": GPUS})
except ValidationError as e:
    errors += field_errors(e)


def launch(dry_run: bool) -> jobs.Job:
    """The one engine.jobs call behind both the command shown and the Launch button (dry_run: the same
    checks and argv, nothing written or started)."""
    if next_mode:
        return jobs.launch_next_iteration(ws, selected, cfg, dry_run=dry_run)
    return jobs.launch_run(ws, cfg, run_id, dry_run=dry_run)


planned = None
if not errors and cfg is not None:
    try:
        planned = launch(dry_run=True)
    except (StoreError, ConfigError, jobs.JobRunning) as e:
        errors.append(str(e))

if errors:
    st.error("Fix these before launching:\n\n" + "\n".join(f"- {e}" for e in errors))
else:
    st.caption("The Launch button runs:")
    st.code(shlex.join(planned.argv), language="bash")
    if cfg.training.distributed is not None:
        d = cfg.training.distributed
        on = "cuda" if device == "cuda" or (device == "auto" and GPUS) else "cpu"
        guess = d.mixed_precision or (precision if precision != "auto" else ("bf16" if on == "cuda" else "fp32"))
        work = f"runs/{run_id}/train/iter-K"
        st.caption(f"Each train stage then runs {d.num_processes} processes ({d.strategy}, {on}) as"
                   + (" (precision auto: resolved at launch)" if precision == "auto" and not d.mixed_precision else ""))
        st.code(shlex.join(launch_argv(f"{work}/accelerate.yaml", f"{work}/spec.json")), language="bash")
        with st.expander(f"{work}/accelerate.yaml"):
            st.code(yaml.safe_dump(accelerate_config(d, on, guess, cfg.training.gradient_accumulation_steps),
                                   sort_keys=False), language="yaml")
    if "tensorboard" in cfg.training.report_to:
        st.caption(f"TensorBoard logs go to runs/{run_id}/tb/iter-K: `tensorboard --logdir "
                   f"{ws / 'runs' / run_id / 'tb'}`")

if launch_clicked:
    if errors or cfg is None:
        st.warning("Nothing was launched.")
    else:
        try:
            job = launch(dry_run=False)
        except jobs.JobRunning as e:
            st.error(str(e))
        except (StoreError, ConfigError, ValueError) as e:
            st.error(f"Not launched: {e}")
        else:
            st.session_state[LAUNCHED_KEY] = job.run_id
            st.session_state[state.RUN_KEY] = job.run_id
            st.session_state["l_run_id_default"] = None  # a fresh id for the next new run
            state.clear()
            st.success(f"Started {job.run_id} (pid {job.pid}).")

# ------------------------------------------------------------------ what-if curation preview

st.subheader("Curation preview")
sampled = []
if selected:
    table = state.cached(queries.iterations_table, selected)
    sampled = table.filter((pl.col("iteration") > 0) & (pl.col("sample_status") == "done"))["iteration"].to_list()
if not sampled:
    st.caption("Select a run with a sampled iteration to preview these curation settings on its judgments.")
else:
    it = max(sampled)
    try:
        cur = CurationConfig.model_validate(raw["curation"])
        report = state.cached(preview, selected, it, cur)
    except (ValidationError, ValueError) as e:
        st.caption(f"No preview: {e}")
    else:
        st.caption(f"These settings on {selected}, iteration {it}: {report['judgments']} judgments"
                   f" of {report['items']} items ({report['duplicates']} duplicate texts).")
        c = st.columns(2 + len(report["skipped"]))
        c[0].metric("Pairs", report["pairs"])
        c[1].metric("Items with pairs", report["items_with_pairs"])
        for col, (reason, count) in zip(c[2:], report["skipped"].items()):
            col.metric(f"skipped: {reason.replace('_', ' ')}", count)
        bias = report["length_bias"] or {}
        if bias.get("chosen_mean_chars") is not None:
            c = st.columns(3)
            c[0].metric("Chosen rationale (mean chars)", f"{bias['chosen_mean_chars']:.0f}")
            c[1].metric("Rejected rationale (mean chars)", f"{bias['rejected_mean_chars']:.0f}")
            c[2].metric("Length ratio chosen / rejected", "-" if bias["ratio"] is None else f"{bias['ratio']:.2f}")
        for warning in report["warnings"]:
            st.warning(warning)
        left, right = st.columns(2)
        gaps = pl.DataFrame({"gap": list(report["margin_hist"]), "pairs": list(report["margin_hist"].values())})
        gap_title = {"gold": "|rejected score - gold|", "majority": "|rejected score - modal score|",
                     "meta": "rating chosen - rating rejected"}[report["strategy"]]
        left.plotly_chart(px.bar(gaps, x="gap", y="pairs", title=f"{gap_title} per pair"),
                          key="preview_margin_hist")
        chosen = pl.DataFrame({"score": list(report["chosen_score_hist"]),
                               "pairs": list(report["chosen_score_hist"].values())})
        right.plotly_chart(px.bar(chosen, x="score", y="pairs", title="Chosen score per pair"),
                           key="preview_chosen_hist")

# ------------------------------------------------------------------ the job

st.subheader("Job")
job_run = st.session_state.get(LAUNCHED_KEY) or selected
if job_run:
    components.job_panel(job_run)
    tb_dir = ws / "runs" / job_run / "tb"
    if tb_dir.is_dir():
        st.caption(f"TensorBoard logs of {job_run} ({', '.join(sorted(p.name for p in tb_dir.iterdir()))}):")
        st.code(shlex.join(["tensorboard", "--logdir", str(tb_dir)]), language="bash")
else:
    st.caption("No run selected.")
