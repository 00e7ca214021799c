"""cloudedge.pretrain."""
