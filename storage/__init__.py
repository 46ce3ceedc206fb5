"""Durable artifacts of a nasfcos run (feature store, results table, run directory)."""
