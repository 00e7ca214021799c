"""cloudedge.adapt."""
