"""cloudedge.fleet."""
