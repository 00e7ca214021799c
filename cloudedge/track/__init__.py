"""cloudedge.track."""
