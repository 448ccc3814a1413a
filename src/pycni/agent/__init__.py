"""The per-node agent: runs the core warm and serves CNI calls from the thin executable."""
