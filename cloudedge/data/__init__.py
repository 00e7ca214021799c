"""cloudedge.data."""
