"""Model building for trials: pretrained HF encoders, the built-in encoder, and surgery on both.

Kept import-light on purpose: the service imports `trainer.modeling.build` to validate
specs (`model_depth_and_heads`) without loading torch or transformers.
"""
