"""cloudedge.bench."""
