"""mobiletl (being written)."""
