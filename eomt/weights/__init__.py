"""Weights in and out: reading any supported file into our layout and the model it belongs to
(`load`), the files themselves (`files`), foreign layouts (`layouts`, `export`) and configs
inferred from weights (`architecture`)."""

from eomt.weights.load import (
    describe_mismatch,
    from_checkpoint,
    holds_decoder_only,
    key_group,
    load_checkpoint,
    load_model,
    load_state,
    load_weights,
    with_encoder,
)

__all__ = [
    "describe_mismatch",
    "from_checkpoint",
    "holds_decoder_only",
    "key_group",
    "load_checkpoint",
    "load_model",
    "load_state",
    "load_weights",
    "with_encoder",
]
