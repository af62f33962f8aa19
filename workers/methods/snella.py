"""snella (being written)."""
