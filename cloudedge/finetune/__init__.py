"""cloudedge.finetune."""
