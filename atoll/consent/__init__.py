"""What contributors allowed: contributions, consent, revocation, deduplication."""
