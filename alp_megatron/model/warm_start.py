"""The embedded default's starting point: a tiny char-level Llama, warm-started on a toy task.

A random model trained by RL with a partial reward learns to drop ``<eos>``; a few dozen supervised steps on
correct examples (answer and ``<eos>`` tokens only) teach the output format first, while leaving the task
itself mostly unlearned (greedy exact match stays near 0 on rev4), so the reward has to be earned by RL.
Plain ``transformers`` + PyTorch, on one process, before any Megatron rank starts.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from alp_megatron.data.toy import ToyTaskPrompts, tool_trace, toy_task
from alp_megatron.model.tiny import build_char_tokenizer, save_tiny_model

logger = logging.getLogger(__name__)

# 2 layers, hidden 64, tied embeddings: about 130k parameters; learns the toy tasks in seconds on 2 cores.
TINY_DEMO_SHAPE = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=16, max_position_embeddings=64, tie_word_embeddings=True)


def ensure_warm_started_model(folder: str, task: str, steps: int, seed: int, num_layers: int,
                              architecture: str = "LlamaForCausalLM") -> str:
    """``folder`` with the warm-started tiny model, built only when it is not there yet, through a staging
    folder renamed at the end (a crash never leaves a half-written model behind)."""
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        logger.info("building the tiny %s (%d layers), %d warm-start steps on %s, seed %d",
                    architecture, num_layers, steps, task, seed)
        staging = folder + ".partial"
        shutil.rmtree(staging, ignore_errors=True)
        build_warm_started_model(staging, task, steps, seed=seed, num_layers=num_layers, architecture=architecture)
        os.replace(staging, folder)
    return folder


def build_warm_started_model(out_dir: str, task: str, steps: int, seed: int = 0, batch_size: int = 64,
                             lr: float = 1e-3, num_layers: int = TINY_DEMO_SHAPE["num_hidden_layers"],
                             architecture: str = "LlamaForCausalLM") -> float:
    """Write the tiny model (``num_layers`` decoder layers of ``architecture``: the demo's Llama, or a
    Qwen3-MoE of 4 experts, top-2, in every layer) to ``out_dir`` after ``steps`` supervised steps on
    ``task``; return the last loss.

    Each step trains next-token cross-entropy on ``batch_size`` correct examples drawn with replacement
    (prompt tokens masked), AdamW at ``lr`` without weight decay.
    """
    from transformers import AutoModelForCausalLM

    toy = toy_task(task)
    shape = {**TINY_DEMO_SHAPE, "num_hidden_layers": num_layers}
    if toy.tool:  # a trajectory: prompt, code, the tool's output and the answer
        shape["max_position_embeddings"] = 128
    if architecture == "Qwen3MoeForCausalLM":  # SGLang 0.5.23's Qwen3-MoE never ties its lm_head to the embedding
        shape["tie_word_embeddings"] = False
    save_tiny_model(out_dir, architecture, seed=seed, characters=toy.characters, **shape)
    if steps == 0:
        return float("nan")
    tokenizer = build_char_tokenizer(toy.characters)
    prompts = ToyTaskPrompts(task, tokenizer)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    rows = [_example(prompts[index], tokenizer, toy) for index in range(len(prompts))]
    width = max(len(tokens) for tokens, _ in rows)
    tokens = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(tokens, -100)
    for i, (sequence, learned) in enumerate(rows):
        tokens[i, : len(sequence)] = torch.tensor(sequence)
        labels[i, : len(sequence)] = torch.where(torch.tensor(learned), tokens[i, : len(sequence)], -100)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        chosen = torch.randint(0, len(rows), (batch_size,), generator=generator)
        loss = model(input_ids=tokens[chosen], labels=labels[chosen]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(out_dir)
    logger.info("warm start on %s: %d steps, last loss %.3f", task, steps, float(loss))
    return float(loss)


def _example(prompt, tokenizer, toy) -> tuple[list[int], list[bool]]:
    """A correct example of ``prompt`` as token ids, and which of them are learned (the model's tokens and the
    final ``<eos>``; not the prompt, nor a tool's output)."""
    tokens, learned = list(prompt.prompt_ids), [False] * len(prompt.prompt_ids)
    if toy.tool:
        from alp_megatron.rollout.tools import SimpleTIRFormat, ToolResult

        observe = SimpleTIRFormat().observation
        segments = tool_trace(prompt.prompt_text, str(prompt.label), lambda printed: observe(ToolResult(printed)))
    else:
        segments = [(str(prompt.label), True)]
    for text, by_model in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        tokens += ids
        learned += [by_model] * len(ids)
    return tokens + [tokenizer.eos_token_id], learned + [True]
