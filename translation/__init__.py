"""The encoder-decoder Reformer for translation (README.md here). Run its scripts from the
repository root as modules: python -m translation.translate, python -m translation.compare_translation."""
