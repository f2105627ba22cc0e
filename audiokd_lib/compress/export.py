"""Exporting a trained model to ONNX, checking the copy, and timing it against PyTorch.

ONNX is a file format for a network's graph and weights that runtimes other than PyTorch execute:
ONNX Runtime on a server or a phone, TensorRT, OpenVINO, a browser. Exporting is where a
compressed student leaves the course, so three questions follow it:

- does the ONNX copy compute the same thing? (:func:`check_onnx`: largest difference of the logits,
  their cosine similarity, and whether every clip gets the same top class);
- is it any faster? (:func:`time_onnx`: ONNX Runtime and PyTorch timed by the same loop, same threads);
- can it be used without this project? (:func:`export_onnx` writes the class names and the front-end
  settings into the file's metadata).

Only the head is exported: log-mel features in, logits out, normalisation included. The front end
stays in Python for two reasons: the exporter cannot translate `torch.stft`'s complex output (ONNX's
STFT operator returns real and imaginary parts as a trailing axis, so the front end would need
rewriting), and a deployed model usually gets its features from the platform's own signal
processing code anyway (a C++ or mobile log-mel), which the metadata tells how to configure.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from audiokd_lib.core.files import atomic_path
from audiokd_lib.core.metrics import median_ms
from audiokd_lib.models.classifier import Classifier

if TYPE_CHECKING:
    import onnxruntime


OPSET = 17


# Spec entries left out of the metadata: AST's full configuration (hundreds of lines, the class names
# twice over) describes an architecture the ONNX graph itself now holds.
SPEC_LEFT_OUT = ("ast_config",)


def head_module(model: Classifier) -> nn.Module:
    """`model.head` as a module of its own (normalisation, then the network): features in, logits out.

    It is in the model's mode: the exporter puts a module back in the mode it found it in, which for a
    new module in training mode would switch the model's BatchNorm layers to training behind its back.
    """
    return nn.Sequential(model.normalise, model.net).train(model.training)


def onnx_metadata(model: Classifier) -> dict[str, str]:
    """What a user of the ONNX file alone needs: class names, how to compute the input, how to read the output."""
    spec = {key: value for key, value in model.spec.items() if key not in SPEC_LEFT_OUT}
    return {
        "classes": json.dumps(model.classes),
        "spec": json.dumps(spec, default=str),
        "input": "features (batch, 1, bins, frames): the front end of `spec` (log-mel with spec['features'], or "
                 "AST's extractor) applied to mono audio at spec['sample_rate'] Hz, before normalisation",
        "output": "logits (batch, classes): sigmoid per class if spec['multilabel'], else softmax",
    }


def export_onnx(model: Classifier, example: torch.Tensor, path: str | Path) -> Path:
    """Write `model.head` as an ONNX file (opset 17) with any batch size and clip length; return the path.

    `example` is a batch of features as `model.features` makes them (batch, 1, bins, frames); its values
    do not matter, only its shape and type. The graph is that of inference (BatchNorm with its running
    statistics, dropout off) whatever the model's mode. The file is written atomically, with
    `onnx_metadata` in its metadata_props so that it is usable alone.
    """
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter (dynamo=False), deprecated since torch 2.9 but working: the newer
        # torch.export-based one needs the onnxscript package, cannot write opset 17 (it starts at 18,
        # and its down-conversion fails on this graph), by default spreads the weights over a second `.data` file,
        # and takes seven times longer. Its deprecation notices are silenced; tracer warnings still show.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            head_module(model), (example,), buffer, dynamo=False, opset_version=OPSET,
            input_names=["features"], output_names=["logits"],
            dynamic_axes={"features": {0: "batch", 3: "frames"}, "logits": {0: "batch"}},
        )
    proto = onnx.load_model_from_string(buffer.getvalue())
    for key, value in onnx_metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    return Path(path)


def onnx_session(path: str | Path, threads: int = 1) -> onnxruntime.InferenceSession:
    """An ONNX Runtime CPU session on `threads` threads, run one operator at a time."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # Threads that wait passively, as torch's do under the project's OMP_WAIT_POLICY=PASSIVE: spinning
    # threads on a busy machine turn milliseconds into seconds (see the Makefile).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _inference_head(model: Classifier) -> nn.Module:
    """The head of a model in eval mode; a model still in training mode would compare and time something else."""
    if model.training:
        raise ValueError("the model is in training mode (dropout on, batch statistics in BatchNorm): "
                         "call model.eval() before checking or timing it")
    return head_module(model)


def check_onnx(model: Classifier, path: str | Path, features: torch.Tensor) -> dict[str, Any]:
    """Run the ONNX file and the PyTorch model on the same features and compare their logits.

    Returns the largest absolute difference of any logit, the lowest cosine similarity between the two
    logit vectors of a clip (1.0: same direction), whether every clip's top class agrees, and the clips
    compared. Expect differences around 1e-6: the two runtimes add numbers in different orders.
    """
    with torch.inference_mode():
        expected = _inference_head(model)(features).numpy().astype(np.float64)
    got = onnx_session(path).run(["logits"], {"features": features.numpy()})[0].astype(np.float64)
    cosine = (expected * got).sum(axis=1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    return {
        "max_abs_diff": float(np.abs(expected - got).max()),
        "min_cosine": float(cosine.min()),
        "argmax_agrees": bool((expected.argmax(axis=1) == got.argmax(axis=1)).all()),
        "clips": len(features),
    }


def time_onnx(model: Classifier, path: str | Path, features: torch.Tensor, threads: int = 1, repeats: int = 30,
              warmup: int = 5, batches: tuple[int, ...] = (1, 32)) -> dict[str, dict[int, float]]:
    """Median ms per clip of ONNX Runtime and of PyTorch on the same batches, threads and timing loop.

    A batch of size b is built from the clips of `features`, reused in turn when there are fewer than b.
    Returns {"onnxruntime": {batch: ms per clip}, "pytorch": {...}}, which `pd.DataFrame` shows as a table.
    """
    session, head = onnx_session(path, threads), _inference_head(model)
    times: dict[str, dict[int, float]] = {"onnxruntime": {}, "pytorch": {}}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for batch in batches:
            inputs = features[torch.arange(batch) % len(features)].contiguous()
            array = inputs.numpy()
            times["onnxruntime"][batch] = median_ms(
                lambda x: session.run(["logits"], {"features": x}), array, repeats, warmup) / batch
            times["pytorch"][batch] = median_ms(head, inputs, repeats, warmup) / batch
    finally:
        torch.set_num_threads(previous_threads)
    return times
