"""Audio in: reading files, log-mel features, augmentation (notebook 02).

- `loading`: any file to a mono tensor at a chosen rate (torchaudio/FFmpeg, else soundfile)
- `features`: the log-mel front end and its normalisation statistics
- `augment`: SpecAugment, mixup, gain and noise, rooms, codecs
"""
