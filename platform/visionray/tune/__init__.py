"""Hyperparameter search with Ray Tune: the search spec, the Tune run, results and the resume seal."""
