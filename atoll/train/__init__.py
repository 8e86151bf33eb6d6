"""Training on one machine: the inner trainer, its schedule, the outer optimizer, evaluation."""
