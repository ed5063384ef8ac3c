"""Every model answers one interface, and a registry maps ``model.name`` to its class and config.

    forward(tokens (T, B), state, aux=False) -> (log_probs (T, B, V), state)            # aux=False
                                             -> (log_probs (T, B, V), state, aux dict)  # aux=True
    forward(tokens, state, targets=y (T, B)) -> (log-prob of each target (T, B), state[, aux])  # optional

The log-probs cover the whole vocabulary (they sum to 1) whatever the output layer. Given ``targets``, a
model returns only each target's log-prob, which the loss needs: for the adaptive softmax that is the
clustered path, whose cost follows the head's size, not the vocabulary's (``wordlm.models.words``).

``aux`` holds what a loss term or an evaluation method may need besides the log-probs, under
names every model uses the same way: ``hidden`` (T, B, H), the final features the decoder reads
(after dropout in training), and ``raw_hidden``, the same before that dropout.

A model type is one file here: a class decorated with :func:`register`, naming its config
dataclass (a :class:`~wordlm.config.ModelConfig` subclass), plus one YAML under ``conf/model/``.
Nothing outside this package asks which model type it holds.
"""

import importlib
import pkgutil

from .base import (
    LanguageModel,
    build_model,
    config_class,
    config_from_dict,
    count_params,
    detach_state,
    map_state,
    model_class,
    model_config,
    names,
    register,
    target_log_probs,
    train_flops_per_token,
    validate_model,
)

# The built-in model types register themselves on import.
from .rnn import RNNConfig, RNNModel
from .transformer import TransformerConfig, TransformerModel

# So does every other module in this folder: a new model type is one file here and one YAML in conf/model/.
for _found in pkgutil.iter_modules(__path__):
    if _found.name not in ("base", "words", "rnn", "transformer"):
        importlib.import_module(f"{__name__}.{_found.name}")

__all__ = ["LanguageModel", "RNNConfig", "RNNModel", "TransformerConfig", "TransformerModel", "build_model",
           "config_class", "config_from_dict", "count_params", "detach_state", "map_state", "model_class",
           "model_config", "names", "register", "target_log_probs", "train_flops_per_token", "validate_model"]
