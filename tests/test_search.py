"""Notebook 10's similarity search: the gate, both metric losses by hand, training, ONNX, the index and its
identity, feedback and MMR on toy vectors, the feature cache, results kept by their inputs, twin renders, and
the command line."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import ROOT

from audiokd_lib.beats.pieces import render_versions
from audiokd_lib.cli import main
from audiokd_lib.core.params import SearchIndexParams, SearchParams, load_params
from audiokd_lib.data.tables import plan_soundfonts
from audiokd_lib.search import export, features
from audiokd_lib.search import model as embedding
from audiokd_lib.search.index import IndexMismatch, SearchIndex, benchmark
from audiokd_lib.search.metrics import mmr, prf, retrieval_scores

RATE = 22050
SP = SearchParams(width=4, teacher_width=8, embedding_dim=8, segment_seconds=2.0, segment_hop=1.0, n_mels=16,
                  tempo_lags=12)


def unit(*angles_deg: float) -> np.ndarray:
    """2-D unit vectors at these angles."""
    a = np.radians(angles_deg)
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32)


def test_the_gates_weigh_the_modalities_and_sum_to_one():
    torch.manual_seed(0)
    fusion = embedding.GatedFusion(dim=4, modalities=3)
    vectors = [torch.randn(5, 4) for _ in range(3)]
    fused, weights = fusion(vectors)
    assert weights.shape == (5, 3) and torch.allclose(weights.sum(1), torch.ones(5))
    assert (weights > 0).all()
    with torch.no_grad():  # open the second gate wide and shut the others: the fusion is that modality's vector
        for i, gate in enumerate(fusion.gates):
            gate.weight.zero_()
            gate.bias.fill_(30.0 if i == 1 else -30.0)
    fused, weights = fusion(vectors)
    assert torch.allclose(weights[:, 1], torch.ones(5), atol=1e-6) and torch.allclose(fused, vectors[1], atol=1e-5)
    model = embedding.build(SP, RATE, seed=0)
    frames = features.segment_frames(SP, RATE)
    x = [torch.randn(3, model.spec["inputs"][m], frames) for m in features.MODALITIES]
    out, gate_weights = model.net.eval().embed(*x)
    assert torch.allclose(out.norm(dim=1), torch.ones(3)) and torch.allclose(gate_weights.sum(1), torch.ones(3))


def test_triplet_loss_by_hand():
    # e0, e1: the same piece, 90 degrees apart; e2: another piece, opposite e0. Distances sqrt(2), 2, sqrt(2).
    e, y = torch.from_numpy(unit(0, 90, 180)), torch.tensor([0, 0, 1])
    # (0, 1, 2): sqrt(2) - 2 + 0.2 < 0, satisfied; (1, 0, 2): sqrt(2) - sqrt(2) + 0.2 = 0.2, the only active one.
    assert embedding.triplet_loss(e, y, 0.2).item() == pytest.approx(0.2, abs=1e-5)
    # margin 0.7: both active, 0.7 and sqrt(2) - 2 + 0.7
    assert embedding.triplet_loss(e, y, 0.7).item() == pytest.approx((0.7 + (math.sqrt(2) - 2 + 0.7)) / 2, abs=1e-5)
    far = torch.from_numpy(unit(0, 10, 180)).requires_grad_()
    loss = embedding.triplet_loss(far, y, 0.2)  # every triplet satisfied: zero, and still differentiable
    loss.backward()
    assert loss.item() == 0.0 and far.grad is not None and not far.grad.isnan().any()


def test_supervised_contrastive_loss_by_hand():
    e, y = torch.from_numpy(unit(0, 90, 180)), torch.tensor([0, 0, 1])
    # Anchor 0: similarities 0 (its positive) and -1: -log(e^0 / (e^0 + e^-1)); anchor 1: 0 and 0: log 2;
    # anchor 2 has no positive and does not count.
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert embedding.supcon_loss(e, y, 1.0).item() == pytest.approx(expected, abs=1e-6)
    assert embedding.supcon_loss(e, y, 0.5).item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2,
                                                                    abs=1e-6)
    assert embedding.distill_loss(e, e).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding.distill_loss(e, -e).item() == pytest.approx(2.0, abs=1e-6)


def test_relational_distillation_by_hand():
    # Student: two orthogonal crops (similarities [[1, 0], [0, 1]]); teacher: the same direction twice
    # ([[1, 1], [1, 1]]): the off-diagonal pair differs by 1, twice in four entries.
    student, teacher = torch.from_numpy(unit(0, 90)), torch.from_numpy(unit(0, 0))
    assert embedding.relational_loss(student, teacher).item() == pytest.approx(0.5, abs=1e-6)
    assert embedding.distill_loss(student, teacher, "relational").item() == pytest.approx(0.5, abs=1e-6)
    rotated = torch.from_numpy(unit(30, 120))  # the same relations anywhere else: nothing to learn
    assert embedding.relational_loss(rotated, student).item() == pytest.approx(0.0, abs=1e-6)
    assert embedding.distill_loss(rotated, student, "cosine").item() > 0.1  # while the cosine term still pulls


def test_recall_and_map_by_hand():
    catalogue, groups = unit(0, 20, 40, 60), np.array([1, 2, 1, 2])
    query = unit(0)
    # Ranking 0, 20, 40, 60 degrees: relevant (group 1) at ranks 1 and 3: AP = (1/1 + 2/3) / 2.
    got = retrieval_scores(query, np.array([1]), catalogue, groups, ks=(1, 2))
    assert got["recall@1"] == 1.0 and got["mAP"] == pytest.approx((1 + 2 / 3) / 2) and got["distinct@2"] == 2
    # A perfect ranking (both relevant items first) scores 1; the worst (both last), (1/3 + 2/4) / 2.
    assert retrieval_scores(query, np.array([1]), catalogue, np.array([1, 1, 2, 2]), ks=(1,))["mAP"] == 1.0
    worst = retrieval_scores(query, np.array([1]), catalogue, np.array([2, 2, 1, 1]), ks=(1, 2))
    assert worst["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2) and worst["recall@2"] == 0.0
    # The catalogue searching itself: an item never finds itself; item 1's nearest is item 0 (group 1, not 2).
    got = retrieval_scores(catalogue, groups, catalogue, groups, ks=(1,), exclude_self=True)
    assert got["recall@1"] == 0.0


def test_pseudo_relevance_feedback_on_toy_vectors():
    # Query at 0 degrees; its piece (group 1) at 15, 36 and 60; another piece at -25. Plain search ranks the
    # other piece second; the query averaged with its first result (7.5 degrees) ranks 36 before -25.
    catalogue, groups = unit(15, -25, 36, 60), np.array([1, 2, 1, 1])
    query = unit(0)
    plain = np.argsort(-(catalogue @ query[0]))
    assert list(plain[:3]) == [0, 1, 2]
    assert list(prf(1)(query[0], catalogue, plain)[:3]) == [0, 2, 1]
    index = SearchIndex.build(catalogue, pd.DataFrame({"group": groups}), {"sha256": "x"}, progress=False)
    assert list(index.search(query[0], 3)[1]) == [0, 1, 2]
    assert list(index.search(query[0], 3, prf_k=1)[1]) == [0, 2, 1]
    assert (retrieval_scores(query, np.array([1]), catalogue, groups, ks=(2,), rerank=prf(1))["mAP"]
            > retrieval_scores(query, np.array([1]), catalogue, groups, ks=(2,))["mAP"])


def test_mmr_trades_a_near_duplicate_for_something_new():
    q = np.array([1.0, 0.0, 0.0], np.float32)
    x1 = np.array([0.9, 0.436, 0.0], np.float32)
    x2 = np.array([0.899, 0.438, 0.0], np.float32)  # nearly x1 again
    x3 = np.array([0.8, 0.0, 0.6], np.float32)      # less similar to the query, unlike x1
    catalogue = np.stack([x1, x2, x3]) / np.linalg.norm(np.stack([x1, x2, x3]), axis=1, keepdims=True)
    order = np.argsort(-(catalogue @ q))
    assert list(order) == [0, 1, 2]
    assert list(mmr(1.0, top=3)(q, catalogue, order)) == [0, 1, 2]  # lambda 1: relevance alone
    assert list(mmr(0.5, top=3)(q, catalogue, order)) == [0, 2, 1]
    index = SearchIndex.build(catalogue, pd.DataFrame({"n": range(3)}), {"sha256": "x"}, progress=False)
    scores, ids = index.search(q, 3, mmr_lambda=0.5)
    assert list(ids) == [0, 2, 1] and scores == pytest.approx(catalogue[[0, 2, 1]] @ q)


def test_index_round_trip_and_identity(tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = pd.DataFrame({"file": [f"f{i // 3}.wav" for i in range(300)], "start": [i % 3 for i in range(300)]})
    mine = {"model": "/models/a.pt", "sha256": "a" * 64}
    for kind in ("flat", "ivf", "hnsw"):
        built = SearchIndex.build(vectors, items, mine, kind, SearchIndexParams(nlist=4, nprobe=4), progress=False)
        folder = built.save(tmp_path / kind)
        loaded = SearchIndex.load(folder, expected=mine)
        assert loaded.identity == mine and loaded.items.equals(items)
        for q in vectors[:5]:
            s1, i1 = built.search(q, 5)
            s2, i2 = loaded.search(q, 5)
            assert list(i1) == list(i2) and np.allclose(s1, s2)
        assert i1[0] == 4 and s1[0] == pytest.approx(1.0, abs=1e-5)  # an item finds itself first
    with pytest.raises(IndexMismatch, match="a.pt.*b.pt"):
        SearchIndex.load(tmp_path / "flat", expected={"model": "/models/b.pt", "sha256": "b" * 64})
    with pytest.raises(FileNotFoundError, match="not a search index"):
        SearchIndex.load(tmp_path / "nothing")


def test_exact_and_approximate_indexes_are_benchmarked_side_by_side():
    table = benchmark(SearchIndexParams(sizes=[500, 2000], queries=10, nlist=8), dim=8, progress=False)
    assert list(table["index"]) == ["flat", "ivf", "hnsw"] * 2
    assert (table.loc[table["index"] == "flat", "recall@10 of exact"] == 1.0).all()
    assert table["recall@10 of exact"].between(0, 1).all() and (table["ms per query"] > 0).all()


def _recordings(groups: int, per_group: int, frames: int, seed: int = 0) -> list[embedding.Recording]:
    """Random features with a pattern of each group's own, plus noise."""
    rng = np.random.default_rng(seed)
    inputs = features.channels(SP)
    out = []
    for g in range(groups):
        pattern = {m: rng.standard_normal((c, 1)).astype(np.float32) for m, c in inputs.items()}
        for _ in range(per_group):
            out.append(embedding.Recording(g, {m: p + 0.8 * rng.standard_normal((p.shape[0], frames)).astype(np.float32)
                                               for m, p in pattern.items()}))
    return out


@pytest.mark.parametrize("loss", ["supcon", "triplet"])
def test_metric_learning_separates_the_pieces(loss):
    frames = 3 * features.segment_frames(SP, RATE)
    train = _recordings(12, 2, frames)
    val_recs = _recordings(6, 2, frames, seed=1)

    def segments(recs):
        table = pd.DataFrame({"group": [r.group for r in recs]})
        return features.make_segments(table, [r.features for r in recs], SP, RATE)

    val = (segments(val_recs[0::2]), segments(val_recs[1::2]))
    model = embedding.build(SP, RATE, seed=0)
    before = retrieval_scores(model(val[0].features), val[0].items["group"].to_numpy(), model(val[1].features),
                              val[1].items["group"].to_numpy())["mAP"]
    sp = SP.model_copy(update={"train": SP.train.model_copy(update={"epochs": 6, "pieces_per_batch": 6})})
    fit = embedding.train_embedding(model, train, val, sp, 0, loss=loss, progress=False)
    assert fit.best["mAP"] > max(before, 0.6) and fit.best["recall@5"] == 1.0
    assert list(fit.history.columns) == ["epoch", "train_loss", "val_recall@5", "val_mAP", "seconds"]



@pytest.mark.parametrize("kind", ["relational", "cosine"])
def test_a_distilled_student_moves_toward_the_large_model(kind):
    """kd_alpha 1: the student learns the trained large model's embedding alone; its distance to it falls,
    and ends below that of the same student trained by the metric loss alone."""
    frames = 3 * features.segment_frames(SP, RATE)
    train, val_recs = _recordings(12, 2, frames), _recordings(6, 2, frames, seed=1)
    table = pd.DataFrame({"group": [r.group for r in val_recs]})
    val = features.make_segments(table, [r.features for r in val_recs], SP, RATE)
    sp = SP.model_copy(update={"kd_alpha": 1.0, "kd_loss": kind, "train": SP.train.model_copy(
        update={"epochs": 8, "pieces_per_batch": 6, "lr": 0.01})})
    teacher = embedding.build(sp, RATE, width=SP.teacher_width, seed=1)
    embedding.train_embedding(teacher, train, (val, val), sp, 1, supcon_temperature=0.5, progress=False)

    def distance(student) -> float:
        return embedding.distill_loss(torch.from_numpy(student(val.features)), torch.from_numpy(teacher(val.features)),
                                      kind).item()

    distilled, alone = embedding.build(sp, RATE, seed=2), embedding.build(sp, RATE, seed=2)
    before = distance(distilled)
    embedding.train_embedding(distilled, train, (val, val), sp, 0, teacher=teacher, progress=False)
    embedding.train_embedding(alone, train, (val, val), sp, 0, progress=False)
    assert distance(distilled) < 0.75 * before and distance(distilled) < distance(alone)


def _search_data():
    frames = 3 * features.segment_frames(SP, RATE)
    train, val_recs = _recordings(8, 2, frames), _recordings(4, 2, frames, seed=1)
    table = pd.DataFrame({"group": [r.group for r in val_recs]})
    val = features.make_segments(table, [r.features for r in val_recs], SP, RATE)
    return train, (val, val), SP.model_copy(update={"train": SP.train.model_copy(update={"epochs": 3,
                                                                                          "pieces_per_batch": 4})})


def test_an_interrupted_embedding_training_resumes_and_ends_the_same(tmp_path):
    train, val, sp = _search_data()
    whole = embedding.build(sp, RATE, seed=0)
    uninterrupted = embedding.train_embedding(whole, train, val, sp, 0, tmp_path / "whole", progress=False)

    def stop(row):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embedding.train_embedding(embedding.build(sp, RATE, seed=0), train, val, sp, 0, tmp_path / "cut",
                                  on_epoch=stop, progress=False)
    epochs, resumed_model = [], embedding.build(sp, RATE, seed=0)
    resumed = embedding.train_embedding(resumed_model, train, val, sp, 0, tmp_path / "cut", progress=False,
                                        on_epoch=lambda row: epochs.append(row["epoch"]))
    assert epochs == [2, 3]
    columns = ["epoch", "train_loss", "val_recall@5", "val_mAP"]
    pd.testing.assert_frame_equal(resumed.history[columns], uninterrupted.history[columns])
    assert resumed.best == uninterrupted.best and resumed.best_epoch == uninterrupted.best_epoch
    for name, tensor in whole.net.state_dict().items():
        assert torch.equal(tensor, resumed_model.net.state_dict()[name]), name


def test_a_second_embedding_fit_with_the_same_settings_reuses_the_run(smoke_profile, monkeypatch):
    params = load_params(smoke_profile)
    train, val, sp = _search_data()
    params = params.model_copy(update={"search": sp})
    first_model = embedding.build(sp, RATE, seed=0)
    first = embedding.fit_embedding(params, "search-student-supcon", first_model, train, val)
    assert not first.reused and first.run["role"] == "search-student" and first.run["macs"] > 0
    assert first.run["val_recall_at_5"] == first.best["recall@5"]

    def refuse(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(embedding, "train_embedding", refuse)
    again_model = embedding.build(sp, RATE, seed=0)
    again = embedding.fit_embedding(params, "search-student-supcon", again_model, train, val)
    assert again.reused and again.run_id == first.run_id and again.best == first.best
    for name, tensor in first_model.net.state_dict().items():
        assert torch.equal(tensor, again_model.net.state_dict()[name]), name
    with pytest.raises(AssertionError, match="trained again"):  # another temperature: another run
        embedding.fit_embedding(params, "search-student-supcon", embedding.build(sp, RATE, seed=0), train, val,
                                supcon_temperature=0.1)


def test_onnx_matches_pytorch_and_embeds_a_file(tmp_path):
    model = embedding.build(SP, RATE, seed=0)
    path = embedding.save(model, tmp_path / "model.pt")
    onnx_path = export.export_onnx(model, path.with_suffix(".onnx"))
    frames = features.segment_frames(SP, RATE)
    x = {m: torch.randn(4, c, frames) for m, c in features.channels(SP).items()}
    parity = export.check_onnx(model, onnx_path, x, repeats=2)
    assert parity["mse"] < 1e-10 and parity["min_cosine"] > 0.99999 and parity["segments"] == 4
    assert isinstance(export.runtime(path), export.OnnxEmbedder)  # model.onnx beside model.pt: ONNX Runtime
    wave = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(3.5 * RATE)) / RATE).astype(np.float32)
    sf.write(tmp_path / "tone.wav", wave, RATE)
    vectors, starts = export.embed_file(export.runtime(path), tmp_path / "tone.wav")
    torch_vectors, _ = export.embed_file(embedding.load(path), tmp_path / "tone.wav")
    assert starts == [0.0, pytest.approx(1.0, abs=0.03)] and vectors.shape == (2, SP.embedding_dim)
    assert np.allclose(vectors, torch_vectors, atol=1e-5)
    sf.write(tmp_path / "short.wav", wave[:RATE // 2], RATE)  # shorter than a segment: one, padded
    assert export.embed_file(embedding.load(path), tmp_path / "short.wav")[0].shape == (1, SP.embedding_dim)


def test_features_are_cached_and_resumed(tmp_path, monkeypatch):
    wave = np.random.default_rng(0).standard_normal(3 * RATE).astype(np.float32) * 0.1
    sf.write(tmp_path / "a.wav", wave, RATE)
    table = pd.DataFrame({"path": [str(tmp_path / "a.wav")], "soundfont": ["sf"], "sample_key": ["a"]})
    first = features.cached_features(table, tmp_path / "cache", SP, RATE, progress=False)
    assert {m: x.shape[0] for m, x in first[0].items()} == features.channels(SP)

    def refuse(*args):
        raise AssertionError("recomputed a cached recording")

    monkeypatch.setattr(features, "piece_features", refuse)
    again = features.cached_features(table, tmp_path / "cache", SP, RATE, progress=False)
    assert all(np.array_equal(first[0][m], again[0][m]) for m in features.MODALITIES)
    other = SP.model_copy(update={"n_mels": 8})  # other settings: another folder, never the old files
    assert features.cache_folder(tmp_path / "cache", other, RATE) != features.cache_folder(tmp_path / "cache", SP, RATE)
    monkeypatch.undo()
    assert features.cached_features(table, tmp_path / "cache", other, RATE, progress=False)[0]["timbre"].shape[0] == 8


def test_a_score_rendered_by_two_soundfonts_is_the_same_music(tmp_path):
    smoke = load_params(ROOT / "params" / "smoke.yaml")
    plan = plan_soundfonts(smoke.data)
    pp = smoke.beats.pieces
    one = render_versions(tmp_path, next(iter(plan.train.items())), [5], pp, progress=False)
    two = render_versions(tmp_path, plan.heldout, [5], pp, progress=False)
    assert one.loc[0, "sample_key"] == two.loc[0, "sample_key"] == "beats-0005"
    assert pd.read_csv(one.loc[0, "beats_path"]).equals(pd.read_csv(two.loc[0, "beats_path"]))
    a, b = sf.read(one.loc[0, "path"])[0], sf.read(two.loc[0, "path"])[0]
    assert len(a) == len(b) and not np.allclose(a, b)  # other timbres


def test_index_and_search_from_the_command_line(tmp_path, capsys):
    model = embedding.build(SP, RATE, seed=0)
    model_path = embedding.save(model, tmp_path / "model" / "model.pt")
    music = tmp_path / "music"
    (music / "sub").mkdir(parents=True)
    t = np.arange(int(4 * RATE)) / RATE
    for i, freq in enumerate((220, 330, 495)):
        tone = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        sf.write(music / ("sub" if i else ".") / f"tone{i}.wav", tone, RATE)
    (music / "broken.wav").write_bytes(b"")
    index = tmp_path / "music.index"
    assert main(["index", str(music), "--out", str(index), "--model", str(model_path)]) == 1  # broken.wav: reported
    err = capsys.readouterr().err
    assert "broken.wav" in err and (index / "index.faiss").is_file()
    assert len(pd.read_csv(index / "items.csv")["file"].unique()) == 3
    assert main(["index", str(music), "--out", str(index), "--model", str(model_path)]) == 1  # exists: refused
    assert "exists already" in capsys.readouterr().err
    assert main(["search", str(music / "sub" / "tone1.wav"), "--index", str(index), "--top", "2", "--json"]) == 0
    import json

    results = json.loads(capsys.readouterr().out)
    assert len(results) == 2 and results[0]["file"].endswith("tone1.wav")
    assert results[0]["score"] == pytest.approx(1, abs=1e-4)
    assert main(["search", str(music / "tone0.wav"), "--index", str(index), "--prf", "--mmr", "0.5"]) == 0
    assert "tone0.wav" in capsys.readouterr().out.splitlines()[0]
    other = embedding.save(embedding.build(SP, RATE, seed=1), tmp_path / "other" / "model.pt")
    assert main(["search", str(music / "tone0.wav"), "--index", str(index), "--model", str(other)]) == 1
    assert "built with the model" in capsys.readouterr().err
    assert main(["search", str(music / "broken.wav"), "--index", str(index)]) == 1
    assert "broken.wav" in capsys.readouterr().err
    assert main(["search", str(music / "tone0.wav"), "--index", str(tmp_path / "none")]) == 1
    assert "not a search index" in capsys.readouterr().err


def test_without_a_second_soundfont_validation_searches_itself_and_twins_are_not_measured():
    """A machine with one soundfont (the pip-only fallback, or no transfer soundfont): validation segments
    search each other, and the cross-timbre scores are NaN (not measured), never an error."""
    from audiokd_lib.search.collection import evaluate, search_sets

    frames = 3 * features.segment_frames(SP, RATE)
    recs = _recordings(6, 1, frames)
    table = pd.DataFrame({"sample_key": [f"p{i}" for i in range(6)], "group": range(6), "timbre": "training",
                          "split": ["train", "train", "train", "val", "val", "test"]})
    sets = search_sets(table, [r.features for r in recs], SP, RATE)
    assert sets.val[0] is sets.val[1] and len(sets.twin_queries) == 0 and len(sets.train) == 3
    assert list(sets.val[0].items["group"]) == [3] * 5 + [4] * 5  # 6 s pieces: 2 s segments every second
    model = embedding.build(SP, RATE, seed=0)
    fit = embedding.train_embedding(model, sets.train, sets.val, SP.model_copy(
        update={"train": SP.train.model_copy(update={"epochs": 1})}), 0, progress=False)
    groups = sets.val[0].items["group"].to_numpy()
    vectors = model(sets.val[0].features)
    expected = retrieval_scores(vectors, groups, vectors, groups, (5,), exclude_self=True)
    assert fit.best == pytest.approx({k: expected[k] for k in ("recall@5", "mAP")}, abs=1e-6)  # never itself
    scores = evaluate(model, sets)
    within, groups = model(sets.within.features), sets.within.items["group"].to_numpy()
    assert scores["within_mAP"] == retrieval_scores(within, groups, within, groups, exclude_self=True)["mAP"]
    assert math.isnan(scores["twin_mAP"]) and math.isnan(scores["twin_recall@1"])
    with pytest.raises(ValueError, match="no `val` pieces"):
        search_sets(table[table["split"] != "val"], [r.features for r in recs[:3] + recs[5:]], SP, RATE)


def test_what_notebook_10_measures_is_kept_by_the_key_of_its_inputs(smoke_profile, tmp_path, monkeypatch):
    """The Optuna study, a model's test scores, the re-ranker table, the ONNX check and the index benchmark
    are computed once and read back while their inputs (weights, segments, settings) are the same."""
    from audiokd_lib.search import collection, index

    frames = 3 * features.segment_frames(SP, RATE)
    recs = _recordings(6, 1, frames)
    table = pd.DataFrame({"sample_key": [f"p{i}" for i in range(6)], "group": range(6), "timbre": "training",
                          "split": ["train", "train", "train", "val", "val", "test"]})
    sets = collection.search_sets(table, [r.features for r in recs], SP, RATE)
    sp = SP.model_copy(update={"optuna_trials": 1, "optuna_epochs": 1,
                               "index": SearchIndexParams(sizes=[300], queries=5, nlist=4)})
    params = load_params(smoke_profile)
    params = params.model_copy(update={"search": sp, "beats": params.beats.model_copy(
        update={"pieces": params.beats.pieces.model_copy(update={"sample_rate": RATE})})})
    model = embedding.build(sp, RATE, seed=0)
    rerankers = {"plain": None, "PRF (k=2)": prf(2)}
    first = {"trials": embedding.tune(params, sets.train, sets.val),
             "scores": collection.model_scores(params, "m", model, sets),
             "rerankers": collection.compare_rerankers(params, model, sets, rerankers),
             "onnx": export.export_checked_onnx(model, tmp_path / "m.onnx", sets.within.features),
             "bench": index.scaling_benchmark(params)}
    assert list(first["trials"].columns) == ["number", "lr", "supcon_temperature", "val mAP"]
    assert list(first["rerankers"].index) == list(rerankers) and first["onnx"]["mse"] < 1e-10
    assert first["scores"] == pytest.approx(collection.evaluate(model, sets), nan_ok=True)  # no twins: NaN

    def refuse(*args, **kwargs):
        raise AssertionError("computed again")

    for module, name in ((embedding, "train_embedding"), (collection, "evaluate"), (export, "check_onnx"),
                         (index, "benchmark")):
        monkeypatch.setattr(module, name, refuse)
    again = {"trials": embedding.tune(params, sets.train, sets.val),
             "scores": collection.model_scores(params, "m", model, sets),
             "rerankers": collection.compare_rerankers(params, model, sets, rerankers),
             "onnx": export.export_checked_onnx(model, tmp_path / "m.onnx", sets.within.features),
             "bench": index.scaling_benchmark(params)}
    for key in ("trials", "rerankers", "bench"):
        pd.testing.assert_frame_equal(again[key], first[key])
    assert again["scores"] == pytest.approx(first["scores"], nan_ok=True) and again["onnx"] == first["onnx"]
    (tmp_path / "m.onnx").unlink()
    with pytest.raises(AssertionError, match="computed again"):  # the export is gone: exported and checked again
        export.export_checked_onnx(model, tmp_path / "m.onnx", sets.within.features)
    with torch.no_grad():
        model.net.project.weight.add_(1.0)
    with pytest.raises(AssertionError, match="computed again"):  # other weights: measured again
        collection.model_scores(params, "m", model, sets)
