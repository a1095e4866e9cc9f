"""Noise generators, one module per method; each registers itself by name on import."""
