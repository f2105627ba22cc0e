# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10 · Audio similarity search: a small, distilled embedding model behind a FAISS index
#
# "Find music that sounds like this" is a nearest-neighbour search: every recording of a catalogue is
# cut into segments, each segment becomes a vector (an *embedding*) such that segments of the same
# music lie close together, and a query's vector is compared with all of them. Production systems
# embed each segment with several views of the audio (timbre, harmony, rhythm) fused by a learned
# gate, learn the embedding with a metric loss, export the model, and search an approximate index.
# This notebook builds that system at the course's scale, and applies the course's lesson to it:
#
# 1. **the collection**: notebook 09's procedural pieces, some of them played again by a second band
#    (another soundfont): the same score in other timbres;
# 2. **three views, cached**: log-mel (timbre), a 24-bin chromagram (harmony), the onset envelope
#    and its tempogram (rhythm); 6 s segments every 2 s;
# 3. **the model**: a backbone per view, gated fusion, a unit-length embedding; trained with a
#    **triplet** loss and with a **supervised contrastive** loss, positives being other segments of the
#    same piece; early stopping on validation recall@5; a short **Optuna** search;
# 4. **distillation**: a model four times wider is trained the same way, and the small one learns its
#    embedding: what does it keep?
# 5. **ONNX**: the small model exported and checked against PyTorch;
# 6. **the index**: FAISS, exact and approximate (IVF, HNSW) compared as the catalogue grows to
#    `search.index.sizes`; pseudo-relevance feedback and MMR re-ranking, each measured;
# 7. **listening**: a query in an unseen soundfont and what it finds.
#
# From the command line: `audiokd index DIR... --out INDEX` and `audiokd search FILE --index INDEX`.

# %% tags=["parameters"]
params_file = "params/quick.yaml"

# %%
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from IPython.display import Markdown, display
from torch import nn

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.core import plots
from audiokd_lib.core.params import load_params
from audiokd_lib.data import tables
from audiokd_lib.models.reuse import add_scores
from audiokd_lib.search import export
from audiokd_lib.search import model as embedding
from audiokd_lib.search.collection import compare_rerankers, model_scores, render_collection, search_sets
from audiokd_lib.search.features import MODALITIES, cached_features
from audiokd_lib.search.index import SearchIndex, scaling_benchmark
from audiokd_lib.search.metrics import mmr, prf

params = load_params(params_file)
sp, rate = params.search, params.beats.pieces.sample_rate
torch.set_num_threads(params.threads)
device = "cuda" if torch.cuda.is_available() else "cpu"  # mixed precision on CUDA

# %% [markdown]
# ## 1 · The collection
#
# Each piece is a *composition* (a `group`): notebook 09 rendered it once, with the training soundfont
# (`train`, `val`, `test`) or with the held-out one (`heldout`). Here some are rendered again:
#
# - `train` and `val` compositions with the transfer soundfont: the same music in other timbres, a
#   positive in training, and what validation measures;
# - `test` compositions with the held-out soundfont, and `heldout` compositions with the training
#   soundfont: every unseen composition exists in both, for the cross-timbre test. No model hears the
#   held-out soundfont before that test.

# %%
plan = tables.plan_soundfonts(params.data)
table = render_collection(params, plan)
display(table.groupby(["split", "timbre"]).size().unstack(fill_value=0))

# %% [markdown]
# ## 2 · Three views of every segment, cached
#
# One STFT gives all three: the log-mel spectrogram (in bels), the chromagram (energy per quarter
# tone, octaves folded), and the onset-strength envelope with its local autocorrelation (the
# tempogram: a beat period shows as a bright lag). Computed once per recording and cached under a
# folder named after the settings; `search.hpss: true` first splits harmonic from percussive sounds.

# %%
features = cached_features(table, params.output_dir / "features" / "search", sp, rate)
sets = search_sets(table, features, sp, rate)
train, val, within, twin_queries, catalogue = sets.train, sets.val, sets.within, sets.twin_queries, sets.catalogue
print(f"training: {len(train)} recordings of {len({r.group for r in train})} pieces; "
      f"validation: {len(val[0])} + {len(val[1])} segments; held-out pieces: {len(within)} segments; "
      f"cross-timbre: {len(twin_queries)} queries against {len(catalogue)} segments")

fig, axes = plt.subplots(1, 3, figsize=(12, 3))
for ax, m in zip(axes, MODALITIES):
    ax.imshow(within.features[m][0].numpy(), aspect="auto", origin="lower", cmap="magma")
    ax.set(title=m, xlabel="frame")
axes[0].set_ylabel(within.items["sample_key"].iloc[0])
fig.tight_layout()
plots.save_fig(fig, params, "10_views")
plt.show()

# %% [markdown]
# ### Gated fusion, in code
#
# Each view goes through its own backbone to a vector of the same size. A linear layer and a sigmoid
# per view score how much that view should count for *this* segment (a drum solo has little harmony to
# offer), the scores are normalised to sum to one, and the fused vector is the weighted sum. The weights
# come out too, so we can later ask what the model listens to. The library's class
# (`audiokd_lib/search/model.py`; a test checks the two copies are the same code):

# %%
# lesson code: audiokd_lib.search.model.GatedFusion
class GatedFusion(nn.Module):
    """Modality vectors [(batch, dim)] -> (fused (batch, dim), weights (batch, modalities) summing to 1)."""

    def __init__(self, dim: int, modalities: int):
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(dim, 1) for _ in range(modalities))

    def forward(self, vectors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        gates = torch.cat([torch.sigmoid(gate(v)) for gate, v in zip(self.gates, vectors)], dim=1)
        weights = gates / gates.sum(dim=1, keepdim=True)
        return (weights.unsqueeze(-1) * torch.stack(vectors, dim=1)).sum(dim=1), weights

# %% [markdown]
# ## 3 · Metric learning, and a short hyper-parameter search
#
# A batch holds `pieces_per_batch` pieces x `segments` random 6 s crops of each (from any of its
# recordings). The **triplet loss** pushes every negative at least `margin` further from an anchor than
# its positives; the **supervised contrastive loss** is a softmax over the batch in which the positives
# must win, sharpened by a low temperature (`search.supcon_temperature`; not notebook 05's
# `kd.temperature`, which softens a teacher's probabilities). After every epoch the validation pieces in the training
# soundfont search the same pieces in the transfer soundfont; the epoch with the best recall@5 (ties
# broken by mAP) is kept.
#
# Optuna first tries `search.optuna_trials` learning rates and temperatures for the small contrastive
# model, each trained `search.optuna_epochs` epochs and scored by validation mAP (recall@5 is often
# already perfect, so it cannot rank them). All four models below use the best trial's learning rate
# (and the contrastive ones its temperature). The study is kept with its settings and data, and run
# again only when those change.
#
# ### The two metric losses, in code
#
# Both read the batch's labels (the piece of each crop) as two masks: positives (same piece, not itself)
# and negatives (another piece).

# %%
# lesson code: audiokd_lib.search.model.pair_masks
def pair_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive, negative) masks of a batch: same label and not itself; other label."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


# %% [markdown]
# The **triplet loss** looks at every (anchor, positive, negative) of the batch and asks the positive to
# be nearer than the negative by `margin`. Most triplets soon satisfy it and add zero; averaging only
# over those that still violate it keeps the hard ones from being drowned.

# %%
# lesson code: audiokd_lib.search.model.triplet_loss
def triplet_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float = 0.2) -> torch.Tensor:
    """Batch-all triplet loss: max(0, d(a, p) - d(a, n) + margin) over every (anchor, positive, negative)
    of the batch, averaged over the triplets that still violate the margin (Hermans et al. 2017's
    "batch all"; averaging over all of them would let the many easy ones drown the few that teach).
    d is the Euclidean distance between unit vectors, sqrt(2 - 2 cos)."""
    cos = embeddings @ embeddings.T
    distance = (2 - 2 * cos).clamp_min(1e-12).sqrt()
    positive, negative = pair_masks(labels)
    losses = F.relu(distance[:, :, None] - distance[:, None, :] + margin)
    losses = losses[positive[:, :, None] & negative[:, None, :]]
    active = losses > 0
    return losses[active].mean() if active.any() else losses.sum() * 0.0


# %% [markdown]
# The **supervised contrastive loss** is a softmax over the batch for every anchor: each positive must
# take a large share of the probability against *all* the other crops at once, not one negative at a
# time. The temperature divides the cosine similarities: low, and the nearest negatives dominate.

# %%
# lesson code: audiokd_lib.search.model.supcon_loss
def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out): for each anchor with positives,
    -mean over positives p of log(exp(s_ap / T) / sum over every other a' of exp(s_aa' / T))."""
    positive, _ = pair_masks(labels)
    logits = (embeddings @ embeddings.T / temperature).masked_fill(
        torch.eye(len(labels), dtype=torch.bool, device=labels.device), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    has = positive.any(dim=1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1)[has] / positive.sum(dim=1)[has]
    return per_anchor.mean()


# %%
chosen = {"lr": sp.train.lr, "supcon_temperature": sp.supcon_temperature}
if sp.optuna_trials:
    trials = embedding.tune(params, train, val, device=device)
    display(trials.round(4))
    chosen = trials.loc[trials["val mAP"].idxmax(), ["lr", "supcon_temperature"]].to_dict()
print("chosen:", {k: round(v, 4) for k, v in chosen.items()})

# %% [markdown]
# ## 4 · Four models, and what the small one keeps of the large one's embedding
#
# Two small models (`search.width` channels a backbone), one per loss; the **large** model
# (`search.teacher_width`, contrastive); and a small model **distilled** from it: its loss is
# `(1 - kd_alpha)` x the contrastive loss + `kd_alpha` x a distillation term. With `kd_loss: cosine`
# that term is 1 - the cosine between the two models' embeddings of each crop: the small model must
# put every crop where the large one does. With `relational` (the profile's choice) it is the squared
# difference between the two models' matrices of similarities within the batch (Park et al. 2019):
# the small model must only *relate* the crops as the large one does, which a narrower network can.

# %%
# lesson code: audiokd_lib.search.model.relational_loss
def relational_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relational distillation (Park et al. 2019): the mean squared difference of the two models' in-batch
    cosine-similarity matrices. The student copies how the crops relate, not where they lie, which a
    narrower network (or one with another embedding space) can do."""
    return ((student @ student.T - teacher @ teacher.T) ** 2).mean()


# %% [markdown]
# Each model is one MLflow run (roles `search-teacher` and `search-student`). A run that already finished
# with the same settings (model, loss, learning rate and temperature, seed, the data, the large model's
# weights for the distilled one) is reused, not trained again; one that was interrupted resumes.

# %%
recipes = {"student-triplet": (sp.width, "triplet", None), "student-supcon": (sp.width, "supcon", None),
           "teacher": (sp.teacher_width, "supcon", None), "student-kd": (sp.width, "supcon", "teacher")}
models, fits = {}, {}
for name, (width, loss, teacher) in recipes.items():
    models[name] = embedding.build(sp, rate, width=width, seed=params.seed)
    fits[name] = embedding.fit_embedding(params, f"search-{name}", models[name], train, val, loss, models.get(teacher),
                                         lr=chosen["lr"], supcon_temperature=chosen["supcon_temperature"],
                                         params_file=params_file, device=device)
    print(f"{name}: {models[name].params():,} parameters, best epoch {fits[name].best_epoch} of "
          f"{len(fits[name].history)}, {fits[name].history['seconds'].sum():.0f} s"
          + (" (reused: trained before with these settings)" if fits[name].reused else ""))

# %% [markdown]
# Each model then searches:
#
# - **within-piece** (`test` and `heldout` pieces, each in its own soundfont): every segment queries the
#   others; the other segments of its piece are relevant;
# - **cross-timbre**: every recording in the held-out soundfont queries the training-soundfont
#   recordings of *every* composition (its twin and all the others); its twin's segments are relevant.
#
# recall@k: the share of queries with a relevant segment among the first k results; mAP: the mean of
# each query's average precision over its whole ranking. A model's scores are kept with its weights' key.

# %%
rows, scores = [], {}
for name, model in models.items():
    scores[name] = {f"val_{k}": v for k, v in fits[name].best.items()} | model_scores(params, name, model, sets)
    rows.append({"model": name, "params": model.params(), "MACs a segment": int(fits[name].run["macs"]),
                 **{k.replace("_", " "): scores[name][k] for k in (
                     "val_recall@5", "val_mAP", "within_recall@1", "within_recall@5", "within_recall@10",
                     "within_mAP", "twin_recall@1", "twin_recall@10", "twin_mAP")}})
results = pd.DataFrame(rows).set_index("model")
display(results.round(3))

# %% [markdown]
# The shipped model is the small one with the best validation score (never a test score). Its targets:
# within-piece recall@5 of at least 0.9 on the held-out pieces, cross-timbre recall@10 of at least 0.5.

# %%
small = [n for n in models if n.startswith("student")]
shipped = max(small, key=lambda n: (fits[n].best["recall@5"], fits[n].best["mAP"]))
row, large = results.loc[shipped], results.loc["teacher"]
kept = {name: " / ".join(f"{100 * results.loc[name, f'{task} mAP'] / large[f'{task} mAP']:.0f}%"
                         for task in ("within", "twin") if len(twin_queries) or task == "within")
        for name in ("student-kd", "student-supcon")}
cross = (f"cross-timbre recall@10 {row['twin recall@10']:.3f} (target at least 0.5: "
         f"{'met' if row['twin recall@10'] >= 0.5 else 'not met'})" if len(twin_queries) else
         "cross-timbre: not measured (no held-out soundfont on this machine; notebook 01 says why)")
display(Markdown(
    f"**Shipped: {shipped}** ({row['params']:,.0f} parameters, {large['params'] / row['params']:.1f}x fewer than "
    f"the large model; {large['MACs a segment'] / row['MACs a segment']:.1f}x fewer MACs). "
    f"Within-piece recall@5 {row['within recall@5']:.3f} (target at least 0.9: "
    f"{'met' if row['within recall@5'] >= 0.9 else 'not met'}); {cross}. "
    f"Of the large model's mAP (within-piece / cross-timbre), the distilled small model keeps "
    f"{kept['student-kd']}; the small contrastive model trained alone, {kept['student-supcon']}."))

# %% [markdown]
# How to read it. On rendered pieces the within-piece task is easy: a segment shares 4 s of its 6 s
# with its neighbours, and the pieces differ in tempo, key and band. The cross-timbre task is the
# real test: the query's timbre is one no model heard, so only harmony and rhythm can find the twin,
# and mAP (every segment of the twin, ranked) separates the models where recall@10 cannot.
#
# Distillation can only pass on what the large model knows beyond what the small one learns from the
# labels: compare the large model's row with the small contrastive one's. On pieces this clean and
# this few the gap is a few points of mAP, and one run cannot tell a point of gain from the spread
# between seeds. `scripts/search_ablation.py` repeats the comparison over seeds and distillation
# settings; the README reports what it measured (relational distillation chosen by validation, and
# what it did on the held-out pieces). The other half of the course's lesson holds in every run: the
# small model keeps most of the large one's quality at a fraction of its cost.
#
# ### What the gates listen to
#
# The mean weight of each view, per set: when the timbre is one the model never heard, does it lean
# on harmony and rhythm?

# %%
gates = {}
for label, data in (("training soundfont", catalogue), ("held-out soundfont", twin_queries)):
    if not len(data):
        continue
    with torch.inference_mode():
        _, weights = models[shipped].net.eval().embed(*(data.features[m] for m in MODALITIES))
    gates[label] = dict(zip(MODALITIES, weights.mean(0).numpy()))
pd.DataFrame(gates).T.round(3)

# %% [markdown]
# ### MLflow
#
# Each model's run (roles `search-teacher` and `search-student`) holds its learning curve, size, MACs and
# weights since training; every score above (`twin_mAP`, `within_recall_at_5`, ...) is added to it now
# (a score it already holds is not written again). The shipped model is also copied to
# `models/search-student/`, which the command line uses.

# %%
for name, fit in fits.items():
    added = add_scores(params, fit, scores[name])
    print(f"search-{name}: MLflow run {fit.run_id[:8]}, {len(added)} scores added")
model_path = embedding.ship(params.output_dir / "models" / f"search-{shipped}" / "model.pt",
                            params.output_dir / "models" / "search-student" / "model.pt")

# %% [markdown]
# ## 5 · The small model as ONNX
#
# Exported at opset 17 with the batch and the number of frames left free, checked against PyTorch on
# every held-out segment (mean squared error under 1e-5, cosine above 0.9999), and timed on one thread.
# `model.onnx` beside `model.pt` is what the command line runs when ONNX Runtime is installed. Exported
# again only when the shipped model changed.

# %%
onnx_path = model_path.with_suffix(".onnx")
parity = export.export_checked_onnx(models[shipped], onnx_path, within.features)
print(f"{onnx_path.name}: MSE {parity['mse']:.1e} (target under 1e-5), lowest cosine {parity['min_cosine']:.7f} "
      f"(target above 0.9999) over {parity['segments']} segments; one segment takes "
      f"{parity['pytorch_ms']:.2f} ms in PyTorch, {parity['onnxruntime_ms']:.2f} ms in ONNX Runtime")

# %% [markdown]
# ## 6 · The index, and two query-time tricks
#
# The catalogue (every training-soundfont segment) in an exact FAISS index, saved with its items and
# the identity of the model that made the vectors. Then two tricks search engines use, each measured
# against plain search on both tasks:
#
# - **pseudo-relevance feedback**: average the query with its `prf_k` first results, search again
#   (the results a user would have clicked, assumed relevant);
# - **MMR** (maximal marginal relevance): pick the results one by one, each trading similarity to the
#   query (`mmr_lambda`) against similarity to those already picked: fewer near-duplicates, more
#   different pieces among the first ten (`distinct@10`).

# %%
identity = embedding.identity(model_path, models[shipped].spec)
vectors = export.embed_catalogue(params, model_path, catalogue)  # as the command line embeds: ONNX Runtime
index = SearchIndex.build(vectors, catalogue.items[["sample_key", "soundfont", "group", "start", "path"]], identity)
index_dir = index.save(params.output_dir / "search" / "index")
scores_found, ids = index.search(vectors[0], sp.top)
assert ids[0] == 0, "the index must find an item itself first"

tricks = {"plain": None, f"PRF (k={sp.prf_k})": prf(sp.prf_k),
          f"MMR (lambda={sp.mmr_lambda:g})": mmr(sp.mmr_lambda, sp.top)}
display(compare_rerankers(params, models[shipped], sets, tricks).round(3))

# %% [markdown]
# ## 7 · Exact or approximate, as the catalogue grows
#
# Real catalogues hold millions of segments. An exact index compares the query with every vector; an
# IVF index only with the vectors of the `nprobe` cells nearest to it; HNSW walks a graph. Synthetic
# unit vectors (clustered, like embeddings of many pieces) stand in for a large catalogue: the time of
# one query on one thread, and the share of the exact top 10 each approximate index returns.

# %%
bench = scaling_benchmark(params)
display(bench.round(4))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
for kind, part in bench.groupby("index", sort=False):
    axes[0].plot(part["size"], part["ms per query"], "o-", label=kind)
    axes[1].plot(part["size"], part[f"recall@{10} of exact"], "o-", label=kind)
axes[0].set(xscale="log", yscale="log", xlabel="catalogue size", ylabel="ms per query (1 thread)")
axes[1].set(xscale="log", xlabel="catalogue size", ylabel="recall@10 of the exact results", ylim=(0, 1.02))
axes[0].legend()
fig.tight_layout()
plots.save_fig(fig, params, "10_index_scaling")
plt.show()
flat = bench[bench["index"] == "flat"].set_index("size")["ms per query"]
size = min(flat.index, key=lambda n: abs(n - 10_000))
display(Markdown(f"**One exact query against {size:,} vectors: {flat[size]:.3f} ms** on one thread (target under "
                 f"10 ms: {'met' if flat[size] < 10 else 'not met'}); embedding a 6 s query segment first takes "
                 f"{parity['onnxruntime_ms']:.2f} ms in ONNX Runtime."))

# %% [markdown]
# ## 8 · Listening
#
# A recording in the held-out soundfont (a band the model never heard), and the three catalogue segments
# its first segment finds, with their similarity. Its twin is the same score played by the training
# soundfont. (Without a held-out soundfont, a held-out piece's segment is the query.)

# %%
queries = twin_queries if len(twin_queries) else within
query = queries.items.iloc[0]
first = {m: x[:1] for m, x in queries.features.items()}
found_scores, found = index.search(models[shipped](first)[0], 3)
seconds = round(sp.segment_seconds * rate)


def clip(path: str, start: float) -> np.ndarray:
    return load_audio(path, rate)[0].numpy()[round(start * rate):][:seconds]


print(f"query: {query['sample_key']} in {query['soundfont']} (group {query['group']})")
display(plots.player(clip(query["path"], query["start"])[None], rate))
for score, i in zip(found_scores, found):
    item = index.items.iloc[int(i)]
    twin = "its twin" if item["group"] == query["group"] else "another piece"
    print(f"{score:.3f}: {item['sample_key']} at {item['start']:.0f} s ({twin})")
    display(plots.player(clip(item["path"], item["start"])[None], rate))

# %% [markdown]
# The same from the command line, for any folders of recordings:
#
# ```bash
# audiokd index music/ --out music.index                 # every file, segment by segment (exact index)
# audiokd search song.mp3 --index music.index --top 10   # the files most like song.mp3
# audiokd search song.mp3 --index music.index --prf --mmr 0.5
# ```
#
# The index records the model that built it and refuses to be searched with another.
