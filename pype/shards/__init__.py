"""Queue semantics (queues.py, store.py: plain Python) and the shard actor (shard.py)."""
