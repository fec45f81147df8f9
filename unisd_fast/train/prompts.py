"""Prompt templates of the roles (docs/trainer.md, "Roles") and their tokenization.

The student sees the bare prompt. The teacher sees a reference block with the gold
demonstration, an instruction to solve the problem its own way, then the prompt. A view sees
K other examples as "reference samples (do not solve these)", then the prompt. The negative
teacher is the teacher template with a wrong demonstration. The prompt comes last in every
template so that the completion continues the same text in every role (the method's wording,
adapted to models without a chat template).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplates:
    """Format strings: ``teacher`` takes {prompt} and {demonstration}; a view is
    ``view_header`` + one ``view_reference`` (with {prompt}, {demonstration}) per reference
    + ``view_task`` (with {prompt})."""

    teacher: str = (
        "Reference: an example for a response to the question below.\n"
        "{demonstration}\n"
        "Study the reference, then solve the problem with your own approach.\n\n"
        "{prompt}"
    )
    view_header: str = "Reference samples (do not solve these):\n"
    view_reference: str = "{prompt}{demonstration}\n"
    view_task: str = "\n{prompt}"

    def teacher_text(self, prompt: str, demonstration: str) -> str:
        return self.teacher.format(prompt=prompt, demonstration=demonstration)

    def view_text(self, prompt: str, references) -> str:
        """``references``: (prompt, demonstration) pairs of other examples."""
        refs = "".join(self.view_reference.format(prompt=p, demonstration=d) for p, d in references)
        return self.view_header + refs + self.view_task.format(prompt=prompt)


class PromptEncoder:
    """Turns prompt texts into token ids, through the tokenizer's chat template when it has
    one and ``chat_template`` is true (the text is then the user message)."""

    def __init__(self, tokenizer, chat_template: bool = True):
        self.tokenizer = tokenizer
        self.chat = bool(chat_template and getattr(tokenizer, "chat_template", None))

    def __call__(self, text: str) -> list[int]:
        if self.chat:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(text)["input_ids"]

    def completion(self, text: str, eos_id: int) -> list[int]:
        """Token ids of a completion text followed by the end-of-sequence token."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [eos_id]
