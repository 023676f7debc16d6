"""Wire formats: frames, the message registry, every message."""
