"""The federated algorithm: what a round is, the coordinator, the site, aggregation, checks."""
