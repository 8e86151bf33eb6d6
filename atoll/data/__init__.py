"""Data: preparing token shards, reading them with a resumable cursor, the bundled demo corpora."""
