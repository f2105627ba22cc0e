"""The final results table and its figures (notebook 07), read from the MLflow store alone.

:func:`final_table` takes the newest finished run of every model of :data:`ROLES` and averages the
seeds of one recipe (its `variant` tag) into one row; :func:`save_results` writes results.csv and
results.md; :func:`pareto_figure` and :func:`targets_verdict` read the table back; :func:`sensitivity_figure`
plots notebook 06's pruning curves.

Pruned students are told apart by what their checkpoints say (:func:`pruning_of`: the kind of pruning and
its amount), never by their names: :func:`pruned_students` are those of the profile's chosen settings,
which notebook 07 re-trains, and :func:`final_student` is the one the course ships.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from audiokd_lib.core import tracking
from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.params import Params
from audiokd_lib.core.plots import save_fig
from audiokd_lib.data import real_eval
from audiokd_lib.experiment.results import TABLE_COLUMNS, best_run
from audiokd_lib.models.checkpoints import read_checkpoint

# student-scratch: a pruned architecture re-initialised and distilled, the control for re-training pruned weights
ROLES = ("teacher", "student-baseline", "student-kd", "student-pruned", "student-rekd", "student-finetuned",
         "student-scratch")


RETRAINED = ("student-rekd", "student-finetuned", "student-scratch")  # trained from a pruned student (07)


def pruning_of(run: pd.Series) -> dict:
    """How the model of an MLflow run (a row of :func:`~audiokd_lib.core.tracking.runs_frame`) was pruned, as
    its checkpoint's spec says: {"kind": "structured", "ratio": 0.5, ...}, {"kind": "unstructured", "amount":
    0.5, ...}, or {} for a model that was not."""
    return read_checkpoint(tracking.artifact_path(run, "model.pt"))["spec"].get("pruning") or {}


def is_chosen_pruning(params: Params, pruning: dict) -> bool:
    """Whether `pruning` (a spec's, see :func:`pruning_of`) is one of the profile's chosen settings: unstructured
    at `prune.sparsity` or structured at `prune.channel_ratio`."""
    return ((pruning.get("kind") == "unstructured" and pruning.get("amount") == params.prune.sparsity)
            or (pruning.get("kind") == "structured" and pruning.get("ratio") == params.prune.channel_ratio))


def _with_pruning(params: Params, frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with a `pruning` column (the kind its checkpoint says, for the pruned and re-trained students),
    without pruned students of other settings than the profile's, nor their re-trainings: those stay in the
    MLflow store after `prune.sparsity` or `prune.channel_ratio` change, but not in the table."""
    pruned = frame["role"].isin(("student-pruned", *RETRAINED)) if "role" in frame else frame.index.isna()
    specs = [pruning_of(row) if is_pruned else {} for is_pruned, (_, row) in zip(pruned, frame.iterrows())]
    frame = frame.assign(pruning=[spec.get("kind") for spec in specs])
    keep = [not is_pruned or is_chosen_pruning(params, spec) for is_pruned, spec in zip(pruned, specs)]
    return frame[pd.Series(keep, index=frame.index, dtype=bool)]


def pruned_students(params: Params) -> pd.DataFrame:
    """The newest run of every pruned student (notebook 06) at the profile's chosen settings, with its
    `pruning` kind: the students notebook 07 re-trains."""
    return _with_pruning(params, tracking.runs_frame(params, "student-pruned").drop_duplicates("model"))


def final_student(params: Params) -> pd.Series:
    """The course's final student: the newest re-distilled run (role student-rekd) whose checkpoint says it was
    pruned structurally, at the profile's `prune.channel_ratio`, from trained weights."""
    for _, run in tracking.runs_frame(params, "student-rekd").iterrows():
        pruning = pruning_of(run)
        if pruning.get("kind") == "structured" and is_chosen_pruning(params, pruning) \
                and "reinitialised" not in pruning:
            return run
    raise LookupError(f"no re-distilled student pruned structurally at ratio {params.prune.channel_ratio:g} in "
                      f"{tracking.tracking_uri(params)}: run notebooks 06 and 07 with this profile first")


EXTRA_COLUMNS = {"nonzero_params": "non-zero params", "nonzero_macs": "non-zero MACs",
                 "compressed_mb": "sparse+zip MB"}


MEASURES = [c for c in TABLE_COLUMNS if c not in ("model", "role", "variant", "teacher", "seed")] + list(EXTRA_COLUMNS)


def main_score(table: pd.DataFrame) -> str:
    """The score the course judges by: held-out macro-F1 (mAP for multi-label data), else in-domain."""
    for column in ("heldout macro-F1", "heldout mAP", "test macro-F1", "test mAP"):
        if column in table:
            return column
    raise ValueError("the table has no macro-F1 or mAP column")


def final_table(params: Params) -> pd.DataFrame:
    """One row per model recipe: teacher, baseline, distilled, pruned, re-trained; with ratios.

    Seeds of one recipe (the same `variant` tag) are averaged; `seeds` counts them and the `±` column
    is the standard deviation of the main score over them. The ratio columns divide a row's MACs,
    parameters and batch-32 latency by the teacher's and by the baseline's.
    """
    frame = tracking.runs_frame(params)
    if frame.empty or "role" not in frame:
        raise LookupError(f"no finished runs in {tracking.tracking_uri(params)}: run notebooks 03-07 first")
    frame = _with_pruning(params, frame[frame["role"].isin(ROLES)].drop_duplicates("model"))  # newest of each
    frame = frame.assign(variant=frame["variant"].fillna(frame["model"]) if "variant" in frame else frame["model"])
    measures = [c for c in MEASURES if c in frame and frame[c].notna().any()]
    groups = frame.groupby(["role", "variant"], sort=False)
    table = groups[measures].mean()
    table.insert(0, "seeds", groups.size())
    table.insert(1, "teacher", groups["teacher"].first())
    table.insert(2, "pruning", groups["pruning"].first())  # structured, unstructured, or none
    table = table.reset_index().rename(columns={**TABLE_COLUMNS, **EXTRA_COLUMNS})
    score = main_score(table)
    spread = groups[{v: k for k, v in TABLE_COLUMNS.items()}[score]].std().reset_index(drop=True)
    table.insert(table.columns.get_loc(score) + 1, "±", spread.to_numpy())
    table = table.sort_values("role", key=lambda roles: roles.map(ROLES.index), kind="stable").reset_index(drop=True)
    for reference, role in (("teacher", "teacher"), ("baseline", "student-baseline")):
        ref = table[table["role"] == role]
        if len(ref):
            for column in ("MACs", "params", "latency ms/clip @32"):
                table[f"{column} / {reference}"] = table[column] / ref.iloc[0][column]
    for column in ("params", "non-zero params", "MACs", "non-zero MACs"):
        if column in table:
            table[column] = table[column].round().astype("int64")
    return table


COMPACT = ["role", "variant", "seeds", "test acc", "test macro-F1", "heldout macro-F1", "test mAP", "heldout mAP",
           "±", "real acc", "real macro-F1", "real mAP", "real precision", "params", "non-zero params", "size MB", "MACs", "latency ms", "latency ms/clip @32",
           "MACs / baseline", "latency ms/clip @32 / baseline"]


def save_results(params: Params, table: pd.DataFrame) -> tuple:
    """Write outputs/<profile>/results.csv (every column) and results.md (the columns that fit a page),
    atomically, and return their paths."""
    csv, md = params.output_dir / "results.csv", params.output_dir / "results.md"
    with atomic_path(csv) as tmp:
        table.to_csv(tmp, index=False)
    # The students name the teacher they learnt from; teacher rows name themselves (an ensemble's members too).
    taught = table[table["role"] != "teacher"] if (table["role"] != "teacher").any() else table
    teachers = ", ".join(t for t in taught["teacher"].dropna().unique() if not t.startswith("none"))
    compact = table[[c for c in COMPACT if c in table]]
    with atomic_path(md) as tmp:
        tmp.write_text(f"Profile `{params.profile}`, teacher: {teachers}. Every figure is read from the MLflow store "
                       f"`outputs/{params.profile}/mlflow.db`; all columns in `results.csv`. {real_note(params, table)}"
                       "\n\n" + compact.to_markdown(index=False, floatfmt=".3g") + "\n")
    return csv, md


def compare_profiles(profiles: list[Params]) -> pd.DataFrame:
    """The main score of every model recipe (role, variant) in each profile's results.csv, side by side."""
    columns = {}
    for params in profiles:
        path = params.output_dir / "results.csv"
        if path.is_file():
            table = pd.read_csv(path)
            columns[params.profile] = table.set_index(["role", "variant"])[main_score(table)]
    if not columns:
        raise LookupError("none of the profiles has a results.csv yet: run them through notebook 07")
    return pd.DataFrame(columns)


def real_note(params: Params, table: pd.DataFrame) -> str:
    """What the `real` columns are, or why the table has none."""
    found = real_eval.load_table(params)
    if found is None:
        why = ("data.real_eval.enabled is false" if not params.data.real_eval.enabled
               else "none of the recordings could be had (see notebook 01)")
        return f"No `real` columns: {why}."
    if "real acc" in table:
        return (f"`real`: {len(found)} real recordings of {found['label'].nunique()} instruments (top-1 accuracy, and "
                "macro-F1 over the instruments present), windows combined as `audiokd classify` does; "
                "reported only, never trained or tuned on.")
    if "real mAP" in table:
        return ("`real`: the real solo recordings whose OpenMIC class is among the models' classes, that class their "
                "only positive (mAP over the classes present; precision and recall of the classes named at p >= 0.5 "
                "in results.csv), windows combined as `audiokd classify` does; reported only, never trained on.")
    return "No `real` columns: none of the recordings plays one of these models' classes."


def pareto_figure(params: Params, table: pd.DataFrame) -> Path:
    """Score against MACs (log scale), marker area proportional to the checkpoint size; the front joined.

    Saved as figures/pareto.png; the path is returned. A model is on the Pareto front when no other
    model is both cheaper and better. MACs are the dense
    count that a CPU executes; unstructured-pruned models therefore sit above their parents, not left.
    """
    score = main_score(table)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = dict(zip(ROLES, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for role, rows in table.groupby("role", sort=False):
        ax.scatter(rows["MACs"], rows[score], s=40 + 60 * rows["size MB"], alpha=0.7, label=role,
                   color=colours.get(role))
        for _, row in rows.iterrows():
            ax.annotate(row["variant"], (row["MACs"], row[score]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
    ordered = table.sort_values(["MACs", score], ascending=[True, False])
    front = ordered[ordered[score] >= ordered[score].cummax()]
    ax.step(front["MACs"], front[score], where="post", color="grey", lw=1, ls="--", label="Pareto front")
    ax.set(xscale="log", xlabel="MACs per clip (dense, log scale)", ylabel=score,
           title=f"{params.profile}: score against cost (marker area ~ size MB)")
    ax.legend(fontsize=7, loc="lower right")
    path = save_fig(fig, params, "pareto")
    plt.close(fig)
    return path


def sensitivity_figure(params: Params, curves: pd.DataFrame, metric: str = "macro-F1") -> Path:
    """Scores of pruned copies before any re-training, against sparsity (unstructured) and channel ratio
    (structured). `curves` has columns kind (unstructured, structured, or none for the unpruned model),
    amount, "<split> <metric>" for the evaluation splits and optionally "BatchNorm" (e.g. "as trained",
    "recalibrated"), one line style each."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    columns = [c for c in (f"test {metric}", f"heldout {metric}") if c in curves]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    stages = curves.groupby("BatchNorm", sort=False) if "BatchNorm" in curves else [(None, curves)]
    for ax, (kind, label) in zip(axes, (("unstructured", "share of weights set to zero"),
                                        ("structured", "share of channels removed"))):
        for (stage, stage_rows), style in zip(stages, ("o--", "o-", "s:")):
            rows = stage_rows[stage_rows["kind"].isin([kind, "none"])].sort_values("amount")
            for column, colour in zip(columns, colours):
                ax.plot(rows["amount"], rows[column], style, color=colour,
                        label=column if stage is None else f"{column}, BatchNorm {stage}")
        ax.set(xlabel=label, title=f"{kind} pruning, no re-training", xlim=(-0.02, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=8)
    path = save_fig(fig, params, "sensitivity")
    plt.close(fig)
    return path


def targets_verdict(params: Params, table: pd.DataFrame) -> str:
    """The course's compression targets, checked against the table, one plain line each.

    The structured-pruned, re-distilled student against the baseline (at most half its MACs, faster per
    clip at batch 32); every re-distilled student against the distilled student it was pruned from
    (in-domain and held-out scores within 2 points); and the structured one against its control, the
    same architecture distilled from scratch.
    """
    rekd = table[table["role"] == "student-rekd"]
    slim = rekd[rekd["pruning"] == "structured"]
    base = table[table["role"] == "student-baseline"]
    if slim.empty or base.empty:
        return "No structured re-distilled student or no baseline in the table: nothing to check."
    slim, base = slim.iloc[0], base.iloc[0]
    source = best_run(params, params.prune.source)
    metric = "mAP" if "test mAP" in table else "macro-F1"
    scores = [column for column in (f"test {metric}", f"heldout {metric}") if column in table]
    macs, latency = slim["MACs"] / base["MACs"], slim["latency ms/clip @32"] / base["latency ms/clip @32"]

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [
        (f"- MACs: {slim['MACs']:,} against the baseline's {base['MACs']:,}, a ratio of {macs:.2f} "
         f"(target at most 0.5): {met(macs <= 0.5)}."),
        (f"- Latency per clip at batch 32: {slim['latency ms/clip @32']:.3f} ms against "
         f"{base['latency ms/clip @32']:.3f} ms, a ratio of {latency:.2f} (target: measurably below 1, here below "
         f"0.9): {met(latency < 0.9)}. At batch 1: {slim['latency ms']:.2f} ms against {base['latency ms']:.2f} ms."),
    ]
    for _, row in rekd.iterrows():
        for score in scores:
            points = 100 * (row[score] - source[{v: k for k, v in TABLE_COLUMNS.items()}[score]])
            lines.append(f"- {row['variant']}, {score}: {row[score]:.3f}, {points:+.1f} points from "
                         f"{source['model']}, the distilled student it was pruned from (target: within 2): "
                         f"{met(points >= -2)}.")
    scratch = table[table["role"] == "student-scratch"]
    if len(scratch):
        control = scratch.iloc[0]
        lines.append(f"- Control (Liu et al., 2019): the same architecture distilled from scratch on the same "
                     f"budget scores {', '.join(f'{control[s]:.3f} {s}' for s in scores)}, against "
                     f"{', '.join(f'{slim[s]:.3f}' for s in scores)} for the pruned weights re-distilled.")
    return "\n".join(lines)


def headline(params: Params, table: pd.DataFrame) -> str:
    """The course's answer in plain words: the teacher, the best distilled student and the final one.

    Checked against the targets: a teacher of at least 5x the baseline's and 20x the final student's
    MACs; a distilled student 3 points above the baseline on the held-out score (the seeds' mean); the
    final student at most 1/20 of the teacher's MACs, at least 90% of its held-out score, and faster at
    batch 1 and 32. Written to outputs/<profile>/headline.md as well.
    """
    teacher, base = table[table["role"] == "teacher"], table[table["role"] == "student-baseline"]
    final = table[(table["role"] == "student-rekd") & (table["pruning"] == "structured")]
    if teacher.empty or base.empty or final.empty:
        return "No teacher, baseline or structured re-distilled student in the table: no headline."
    teacher, base, final = teacher.iloc[0], base.iloc[0], final.iloc[0]
    kd = table[table["role"] == "student-kd"]
    score = main_score(table)
    best = kd.loc[kd[score].idxmax()] if len(kd) else None

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = [f"- Teacher: {teacher['teacher'] if isinstance(teacher.get('teacher'), str) else teacher['variant']}, "
             f"{teacher['MACs'] / 1e6:.1f} M MACs a clip: {teacher['MACs'] / base['MACs']:.1f}x the baseline "
             f"student's (target at least 5x: {met(teacher['MACs'] >= 5 * base['MACs'])}) and "
             f"{teacher['MACs'] / final['MACs']:.1f}x the final student's (target at least 20x: "
             f"{met(teacher['MACs'] >= 20 * final['MACs'])}); {score} {teacher[score]:.3f}."]
    if best is not None:
        gain = 100 * (best[score] - base[score])
        lines.append(f"- Distillation: the best distilled student ({best['variant']}) scores {score} "
                     f"{best[score]:.3f} against {base[score]:.3f} for the labels-only baseline, means over "
                     f"{int(best['seeds'])} and {int(base['seeds'])} seeds: {gain:+.1f} points (target at least +3: "
                     f"{met(gain >= 3)}; notebook 05 tests the difference across seeds).")
    share = final[score] / teacher[score]
    batch32 = "latency ms/clip @32"
    faster = [(f"batch 1: {final['latency ms']:.2f} against {teacher['latency ms']:.2f} ms",
               final["latency ms"] < teacher["latency ms"]),
              (f"per clip at batch 32: {final[batch32]:.3f} against {teacher[batch32]:.3f} ms",
               final[batch32] < teacher[batch32])]
    lines.append(f"- The final student ({final['variant']}) keeps {100 * share:.0f}% of the teacher's {score} "
                 f"({final[score]:.3f}; target at least 90%: {met(share >= 0.9)}) with "
                 f"1/{teacher['MACs'] / final['MACs']:.0f} of its MACs (target at most 1/20: "
                 f"{met(final['MACs'] * 20 <= teacher['MACs'])}) and {final['params']:,.0f} parameters against "
                 f"{teacher['params']:,.0f}. CPU latency on {params.threads} thread(s), "
                 + "; ".join(f"{text} ({met(ok)})" for text, ok in faster) + ".")
    if "real acc" in table and pd.notna(teacher.get("real acc")) and pd.notna(final.get("real acc")):
        lines.append(f"- On real recordings (top-1 of {len(real_eval.load_table(params))}): the teacher "
                     f"{teacher['real acc']:.2f} (target at least 0.60: {met(teacher['real acc'] >= 0.6)}), the "
                     f"labels-only baseline {base['real acc']:.2f}"
                     + (f", the best distilled student {best['real acc']:.2f}" if best is not None else "")
                     + f", the final student {final['real acc']:.2f} (target at least 0.45: "
                     f"{met(final['real acc'] >= 0.45)}).")
    text = "\n".join(lines)
    with atomic_path(params.output_dir / "headline.md") as tmp:
        tmp.write_text(f"Profile `{params.profile}`, from `outputs/{params.profile}/results.csv`:\n\n{text}\n")
    return text
