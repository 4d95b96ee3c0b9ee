"""A run's bookkeeping: config checks, paths, the run directory, checkpoint files, trackers, pictures and model cards."""
