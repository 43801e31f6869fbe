"""Prepared corpora: token shards written once by Beam (pipeline.prepare), read by training (source.open)."""
