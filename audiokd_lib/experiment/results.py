"""The course's tables from MLflow, and whether a gain holds across seeds.

The final table is a query of the MLflow store (:func:`results_table`), never numbers copied by hand;
the best model of a role is chosen on validation (:func:`best_run`); a variant's gain over the baseline
is judged over seeds with Welch's t-test and its confidence interval (:func:`compare_to_baseline`).
"""

from __future__ import annotations

import pandas as pd
from scipy import stats

from audiokd_lib.core import tracking
from audiokd_lib.core.params import Params

TABLE_COLUMNS = {
    "model": "model", "role": "role", "variant": "variant", "teacher": "teacher", "seed": "seed",
    "test_accuracy": "test acc", "test_macro_f1": "test macro-F1",
    "heldout_accuracy": "heldout acc", "heldout_macro_f1": "heldout macro-F1",
    "test_mAP": "test mAP", "test_micro_f1": "test micro-F1", "heldout_mAP": "heldout mAP",
    "heldout_micro_f1": "heldout micro-F1", "real_accuracy": "real acc", "real_macro_f1": "real macro-F1",
    "real_mAP": "real mAP", "real_precision": "real precision", "real_recall": "real recall",
    "params": "params", "size_mb": "size MB", "macs": "MACs", "latency_ms": "latency ms",
    "latency_batch_ms": "latency ms/clip @32",
}


def best_run(params: Params, role: str) -> pd.Series:
    """Of the newest run of every model of `role`, the one with the best validation score.

    Chosen on validation, never on test or held-out scores, which would then be optimistic. The members
    of an ensemble (runs tagged `member_of`) are parts of a model, not candidates: the ensemble is.
    """
    runs = tracking.runs_frame(params, role).drop_duplicates("model")
    if "member_of" in runs:
        runs = runs[runs["member_of"].isna()]
    if runs.empty:
        tracking.latest_run(params, role)  # raises, naming the notebook that makes this role
    metric = "val_mAP" if "val_mAP" in runs and runs["val_mAP"].notna().any() else "val_macro_f1"
    return runs.loc[runs[metric].idxmax()]


def results_table(params: Params, roles: list[str] | None = None) -> pd.DataFrame:
    """The newest finished run of every model name (per role), from MLflow, in readable columns."""
    frame = tracking.runs_frame(params)
    if roles is not None:
        frame = frame[frame["role"].isin(roles)]
    frame = frame.drop_duplicates("model")  # newest first: one row per model name
    columns = [c for c in TABLE_COLUMNS if c in frame.columns and frame[c].notna().any()]
    table = frame[columns].rename(columns=TABLE_COLUMNS).reset_index(drop=True)
    for c in ("params", "MACs"):
        if c in table:
            table[c] = table[c].astype("Int64")  # runs without a MAC count (the beat trackers) show <NA>
    return table


def seed_summary(table: pd.DataFrame, value: str, by: str = "role") -> pd.DataFrame:
    """Mean, standard deviation, min and max of one column over seeds, per role."""
    return table.groupby(by, sort=False)[value].agg(["mean", "std", "min", "max", "count"])


def compare_to_baseline(table: pd.DataFrame, score: str, by: str = "variant", baseline: str = "baseline"
                        ) -> pd.DataFrame:
    """Each variant's gain over the baseline in `score`, across seeds, with Welch's t-test.

    Welch's test (scipy) does not assume equal variances; with three seeds a side it is weak, so the 95%
    confidence interval of the difference is given too: a gain holds when the interval excludes zero.
    """
    if "role" in table:  # teacher rows (an ensemble and its members, variants of their own) are no student recipe
        table = table[table["role"] != "teacher"]
    groups = {name: rows[score].dropna().to_numpy() for name, rows in table.groupby(by, sort=False)}
    if baseline not in groups:
        raise ValueError(f"no `{baseline}` rows in column {by!r} to compare with")
    base, rows = groups[baseline], []
    for name, values in groups.items():
        if name in (baseline, "teacher"):
            continue
        row = {by: name, "seeds": len(values), "mean": values.mean(), "baseline mean": base.mean(),
               "difference": values.mean() - base.mean()}
        if min(len(values), len(base)) >= 2:
            test = stats.ttest_ind(values, base, equal_var=False)
            interval = test.confidence_interval(0.95)
            row.update({"95% CI low": interval.low, "95% CI high": interval.high, "Welch t": test.statistic,
                        "p": test.pvalue})
        rows.append(row)
    return pd.DataFrame(rows).set_index(by)


def verdict(comparison: pd.DataFrame, score: str, target: float = 0.03) -> str:
    """One plain sentence per variant of :func:`compare_to_baseline`: a gain that holds, or does not."""
    lines = []
    for variant, row in comparison.iterrows():
        head = (f"- **{variant}**: {score} {row['mean']:.3f} vs baseline {row['baseline mean']:.3f} over "
                f"{int(row['seeds'])} seeds, a difference of {row['difference']:+.3f}")
        if pd.isna(row.get("p")):
            lines.append(f"{head}: too few seeds for a test, so no conclusion.")
            continue
        test = (f"95% CI [{row['95% CI low']:+.3f}, {row['95% CI high']:+.3f}], "
                f"Welch t = {row['Welch t']:.2f}, p = {row['p']:.3f}")
        if row["95% CI low"] > 0:
            met = "meets" if row["difference"] >= target else "falls short of"
            judged = f"a gain that holds, and {met} the {target:+.3f} target"
        elif row["95% CI high"] < 0:
            judged = "a loss that holds"
        else:
            judged = "no difference that holds: the interval includes zero"
        lines.append(f"{head} ({test}): {judged}.")
    return "\n".join(lines)
