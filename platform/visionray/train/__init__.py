"""Training: optimisation, the per-epoch step, the Ray Train worker and its driver."""
