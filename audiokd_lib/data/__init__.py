"""Datasets as one table of clips (notebook 01).

- `tables`: the clip tables every later notebook reads, splits, fingerprints
- `taxonomy`: class names shared across datasets (OpenMIC-2018 instruments, MUSDB groups)
- `synth`, `notes`, `pieces`: the embedded datasets rendered from soundfonts
- `download`, `sources`, `real`: fetching real datasets within a byte budget
- `tinysol`, `irmas`, `openmic`, `esc50`: one downloader and loader per real dataset
"""
