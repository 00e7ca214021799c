"""cloudedge.models."""
