"""cloudedge.engine."""
