"""cloudedge.finetune: hierarchical device -> edge -> cloud federated fine-tuning of LoRA adapters.

See docs/finetuning.md. Entry points: :func:`run_finetune` (CLI), :func:`finetune` (API).
"""

from cloudedge.finetune.loop import FinetuneSettings, HierFinetune, TaskData
from cloudedge.finetune.lora import LORA_MODES, aggregate_lora
from cloudedge.finetune.stage import (
    finetune,
    prepare_task,
    run_finetune,
    settings_from_config,
)
from cloudedge.finetune.sync import POLICIES, SyncPolicy, make_policy

__all__ = [
    "LORA_MODES", "POLICIES", "FinetuneSettings", "HierFinetune", "SyncPolicy", "TaskData",
    "aggregate_lora", "finetune", "make_policy", "prepare_task", "run_finetune", "settings_from_config",
]
