"""Task-vector merging one tensor at a time: pure per-tensor functions (torch only) and a driver that
streams safetensors checkpoints through them (``checkpoint_merge``, which also needs transformers)."""
