"""The warm start's examples: the model's tokens are learned, the prompt and a tool's output are not."""

from alp_megatron.data.toy import ToyTaskPrompts, toy_task
from alp_megatron.model.tiny import build_char_tokenizer
from alp_megatron.model.warm_start import _example


def test_a_single_turn_example_learns_the_answer_and_eos():
    tokenizer = build_char_tokenizer()
    prompt = ToyTaskPrompts("rev4", tokenizer)[1234]
    tokens, learned = _example(prompt, tokenizer, toy_task("rev4"))
    assert tokenizer.decode(tokens) == "<bos>1234=4321<eos>"
    assert learned == [False] * 6 + [True] * 5


def test_a_tool_example_learns_the_code_and_the_answer_not_the_tools_output():
    task = toy_task("mul2")
    tokenizer = build_char_tokenizer(task.characters)
    prompt = ToyTaskPrompts("mul2", tokenizer)[(12 - 10) * 90 + (34 - 10)]
    tokens, learned = _example(prompt, tokenizer, task)
    text = tokenizer.decode(tokens)
    assert text == "<bos>12*34=```\nprint(12*34)\n```\nCode execution result: 408\n\n\\boxed{408}<eos>"
    learned_text = tokenizer.decode([t for t, bit in zip(tokens, learned) if bit])
    assert learned_text == "```\nprint(12*34)\n```\\boxed{408}<eos>"
