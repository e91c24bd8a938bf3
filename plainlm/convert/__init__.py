"""Conversion between plainlm checkpoints and other formats (Hugging Face, later GGUF)."""
