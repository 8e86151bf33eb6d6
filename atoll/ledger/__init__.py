"""The signed, hash-chained contribution ledger and the credit it records."""
