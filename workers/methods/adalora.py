"""adalora (being written)."""
