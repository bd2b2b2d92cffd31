"""Model loading (local Hugging Face folders, GGUF files, the embedded default)."""

from .loader import DEFAULT_MODEL, default_model_dir, load_default_model, load_model, resolve_model_path

__all__ = ["DEFAULT_MODEL", "default_model_dir", "load_default_model", "load_model", "resolve_model_path"]
