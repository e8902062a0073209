"""The model registry: signed, pickle-free model versions (layout, keys, signing, stores, the registry)."""
