"""The embedding model as ONNX, checked against PyTorch, and embedding any audio file with either runtime.

The search engine embeds with ONNX Runtime when the model's `model.onnx` sits beside its `model.pt`
and onnxruntime is installed, with PyTorch otherwise: both give the same vectors to about 1e-7.
Notebook 10 exports and checks once per model (:func:`export_checked_onnx`) and embeds its catalogue once
per model and catalogue (:func:`embed_catalogue`).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch

from audiokd_lib.audio.loading import load_audio
from audiokd_lib.compress.export import onnx_session
from audiokd_lib.core.files import atomic_path, cached, digest, file_digest
from audiokd_lib.core.metrics import median_ms
from audiokd_lib.core.params import Params, SearchParams
from audiokd_lib.core.tracking import settings_key
from audiokd_lib.search import model as embedding
from audiokd_lib.search.features import FEATURE_KEYS, MODALITIES, Segments, make_segments, piece_features

OPSET = 17


def export_onnx(model: embedding.Embedder, path: str | Path, frames: int = 64) -> Path:
    """Export the network (three feature inputs, batch and frames dynamic) to ONNX at opset 17."""
    model.net.eval()
    inputs = tuple(torch.zeros(2, model.spec["inputs"][m], frames) for m in MODALITIES)
    axes = {m: {0: "batch", 2: "frames"} for m in MODALITIES} | {"embedding": {0: "batch"}}
    with atomic_path(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter, as compress/export.py explains
        torch.onnx.export(model.net, inputs, str(tmp), input_names=list(MODALITIES), output_names=["embedding"],
                          dynamic_axes=axes, opset_version=OPSET, dynamo=False)
        onnx.checker.check_model(onnx.load(str(tmp)))
    return Path(path)


class OnnxEmbedder:
    """An exported model run by ONNX Runtime, called like :class:`~audiokd_lib.search.model.Embedder`."""

    def __init__(self, path: str | Path, spec: dict, threads: int = 1):
        self.spec, self.session = spec, onnx_session(path, threads)

    def __call__(self, features: dict[str, torch.Tensor], batch: int = 256) -> np.ndarray:
        def run(*views: torch.Tensor) -> np.ndarray:
            return self.session.run(["embedding"], {m: v.numpy() for m, v in zip(MODALITIES, views)})[0]

        return embedding.in_batches(run, features, self.spec["dim"], batch)


def check_onnx(model: embedding.Embedder, path: str | Path, features: dict[str, torch.Tensor],
               repeats: int = 20) -> dict[str, float]:
    """ONNX Runtime against PyTorch on the same segments: MSE and lowest cosine of the embeddings, and the
    median ms to embed one segment with each (one thread)."""
    onnx_model, expected = OnnxEmbedder(path, model.spec), model(features)
    got = onnx_model(features)
    one = {m: x[:1] for m, x in features.items()}
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        times = {f"{name}_ms": median_ms(run, one, repeats, warmup=1)
                 for name, run in (("pytorch", model), ("onnxruntime", onnx_model))}
    finally:
        torch.set_num_threads(previous)
    return {"mse": float(np.mean((expected - got) ** 2)), "min_cosine": float((expected * got).sum(1).min()),
            "segments": len(expected), **times}


def export_checked_onnx(model: embedding.Embedder, path: str | Path, features: dict[str, torch.Tensor]
                        ) -> dict[str, float]:
    """`model` exported to `path` (:func:`export_onnx`) and checked against PyTorch on the segments `features`
    (:func:`check_onnx`). The check is kept beside the export (`.check.pkl`) with the key of the model's
    weights and the segments: while both are the same and the export is there, nothing is exported or timed
    again."""
    path = Path(path)
    key = settings_key({"model": digest(model.net), "segments": digest(dict(features))})
    return cached(path.with_suffix(".check.pkl"), key, lambda: check_onnx(model, export_onnx(model, path), features),
                  needs=[path])


def embed_catalogue(params: Params, model_path: str | Path, catalogue: Segments) -> np.ndarray:
    """(segments, dim) vectors of every catalogue segment by the model at `model_path`, run as the search engine
    runs it (:func:`runtime`). Kept in `outputs/<profile>/search/catalogue-vectors.pkl` with the key of the
    model file and the segments, and embedded again only when those change."""
    key = settings_key({"model": file_digest(model_path),
                        "segments": digest(catalogue.items["group"].to_numpy(), dict(catalogue.features))})
    return cached(params.output_dir / "search" / "catalogue-vectors.pkl", key,
                  lambda: runtime(model_path)(catalogue.features))


def runtime(model_path: str | Path) -> embedding.Embedder | OnnxEmbedder:
    """The model at `model_path` (a model.pt), run by ONNX Runtime when its model.onnx is beside it."""
    model = embedding.load(model_path)
    onnx_path = Path(model_path).with_suffix(".onnx")
    if onnx_path.is_file():
        try:
            return OnnxEmbedder(onnx_path, model.spec)
        except ImportError:  # onnxruntime missing: PyTorch gives the same vectors
            pass
    return model


def search_params(spec: dict) -> SearchParams:
    """The feature and segment settings a model was trained with, as SearchParams."""
    return SearchParams(**{k: spec["features"][k] for k in FEATURE_KEYS}, segment_seconds=spec["segment_seconds"],
                        segment_hop=spec["segment_hop"])


def embed_file(embedder, path: str | Path) -> tuple[np.ndarray, list[float]]:
    """(segments, dim) embeddings of an audio file and each segment's start in seconds (a file shorter
    than a segment is one segment, padded with silence). Unreadable files raise AudioLoadError."""
    sp, rate = search_params(embedder.spec), embedder.spec["features"]["sample_rate"]
    feats = piece_features(load_audio(path, rate)[0].numpy(), rate, sp)
    segments = make_segments(pd.DataFrame({"group": [0]}), [feats], sp, rate)
    return embedder(segments.features), segments.items["start"].tolist()
