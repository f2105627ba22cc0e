"""Separating mixtures into stems and keeping those of the instruments a classifier hears (notebook 08).

- `crnn`: the mask CRNN trained here
- `separator`: Demucs or the CRNN behind one `separate` call
- `quality`: SDR against exact stems, with the mixture and ideal-mask references
- `stem_selection`: instruments to stems, and writing only the chosen ones
"""
