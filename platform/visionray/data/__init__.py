"""Data: named sources, splits and shards, image folders, streaming, and the per-worker pipelines."""
