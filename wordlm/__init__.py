"""wordlm: word-level language modelling with RNNs and Transformers, on CPU or CUDA."""

__version__ = "0.1.0"
