"""A trained run's life after training: growth, export/import, HuggingFace layouts, inference."""
