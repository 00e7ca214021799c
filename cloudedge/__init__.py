"""cloudedge: cloud-edge collaborative large models.

One framework takes a model through its whole life across a fleet (cloud -> edges -> devices):
collaborative pre-training (`cloudedge.pretrain`), hierarchical federated fine-tuning of adapters
(`cloudedge.finetune`) and test-time prompt adaptation (`cloudedge.adapt`).
"""

__version__ = "0.1.0"
