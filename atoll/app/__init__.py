"""The application layer: a run folder and its loop, simulations, reports, progress, metrics."""
