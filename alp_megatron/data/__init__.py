"""Prompt sources for rollout: JSONL/Parquet datasets, toy tasks, and seeded, resumable batches over either."""

from alp_megatron.data.batches import DataPosition, PromptBatches, PromptSource, epoch_order
from alp_megatron.data.prompts import Prompt, PromptDataConfig, PromptDataset, has_chat_template
from alp_megatron.data.readers import DataError
from alp_megatron.data.toy import TOY_TASKS, ToyTask, ToyTaskPrompts, toy_prompt_batches, toy_task

__all__ = [
    "TOY_TASKS",
    "DataError",
    "DataPosition",
    "Prompt",
    "PromptBatches",
    "PromptDataConfig",
    "PromptDataset",
    "PromptSource",
    "ToyTask",
    "ToyTaskPrompts",
    "epoch_order",
    "has_chat_template",
    "toy_prompt_batches",
    "toy_task",
]
