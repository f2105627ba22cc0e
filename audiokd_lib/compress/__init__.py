"""Making a model smaller: distillation, pruning, export, and measuring the result.

- `distill`: the distillation loss and soft targets (notebook 05)
- `soft_labels`: the teacher's cached logits (notebook 03)
- `prune`: unstructured and channel pruning (notebook 06)
- `export`: ONNX export, checked and timed (notebook 07)
- `bench`: several models measured side by side (`audiokd bench`)
"""
