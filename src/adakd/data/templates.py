"""Prompt templates: the MiniLLM/Alpaca template of the MiniLLM/DistiLLM eval sets, and Qwen2's chat format.

The MiniLLM texts were checked character for character against every record of the shared MiniLLM eval files
(dolly, self-inst, vicuna, sinst/11_, uinst): re-formatting ``instruction``/``input`` gives the stored ``prompt``.
"""

from __future__ import annotations

from ..errors import InputError

__all__ = [
    "MINILLM_PROMPT_NO_INPUT",
    "MINILLM_PROMPT_WITH_INPUT",
    "QWEN2_SYSTEM",
    "TEMPLATES",
    "format_prompt",
]

MINILLM_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
MINILLM_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
QWEN2_SYSTEM = "You are a helpful assistant."

TEMPLATES = ("minillm", "qwen2")


def format_prompt(instruction: str, input: str | None = None, template: str = "minillm") -> str:
    """Format one instruction (and optional input/context) as a prompt that ends where the response begins.

    Args:
        instruction: the task text, used verbatim (no stripping: the MiniLLM files keep inner whitespace).
        input: optional context; ``None`` and ``""`` both select the no-input variant.
        template: one of :data:`TEMPLATES`.

    Returns:
        The prompt string; ``"minillm"`` prompts end with ``"### Response:\\n"``, ``"qwen2"`` prompts with
        ``"<|im_start|>assistant\\n"``.

    Raises:
        InputError: an unknown ``template``.
    """
    if template == "minillm":
        # str.format parses only the template, so braces inside the user text stay as they are.
        if input:
            return MINILLM_PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
        return MINILLM_PROMPT_NO_INPUT.format(instruction=instruction)
    if template == "qwen2":
        user = instruction + ("\n\n" + input if input else "")
        return (
            f"<|im_start|>system\n{QWEN2_SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        )
    raise InputError(f"unknown template {template!r}; valid templates: {', '.join(TEMPLATES)}")
