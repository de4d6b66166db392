"""Running experiments: the step driver, continual runs and merges, their typed results and metrics."""
