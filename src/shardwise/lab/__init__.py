"""An emulated heterogeneous cluster on one Linux machine (shardwise lab up / down)."""
