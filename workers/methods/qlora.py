"""qlora (being written)."""
