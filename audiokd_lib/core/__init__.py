"""The foundation every other part of audiokd_lib stands on; it imports none of them.

- `params`: the settings schema (params/*.yaml), typed
- `metrics`, `losses`: scores and costs measured the same way for every model; the hard-label loss
- `files`: atomic writes, digests, where the project lives
- `loop`: the epoch loop every training shares (early stopping, best epoch, resumable `last.pt`)
- `distributed`: data-parallel training on several processes
- `tracking`: the MLflow store, one logger for every trained model
- `plots`: saving figures under outputs/
"""
