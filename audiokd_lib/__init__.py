"""audiokd: the thin library behind the audiokd notebooks (data, features, training, compression)."""

__version__ = "0.1.0"
