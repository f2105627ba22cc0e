"""The models: a Classifier (front end, normalisation, network), students, teachers, their weights.

- `classifier`: the Classifier every model is
- `students`: MobileNet students (notebook 04)
- `teachers`: EfficientAT mn04 and AST teachers (notebook 03)
- `ensemble`: several fine-tuned teachers as one model averaging their logits (notebook 03)
- `weights`: finding or downloading pretrained files, checked by SHA-256
- `checkpoints`: saving a model with the spec that rebuilds it, and loading it back
- `reuse`: a model trained outside the classification runs (notebooks 09, 10), reused by its settings
"""
