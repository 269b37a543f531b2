"""Checkpoints: DCP save/load, shard storage and integrity, the run directory."""
