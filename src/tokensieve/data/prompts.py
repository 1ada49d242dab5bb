"""The evaluation prompt, shared by evaluation, ``tokensieve run`` and training.

Training's first turn must be byte-for-byte the prompt evaluation asks with, so the one definition lives here, below
both ``tools/`` and ``trainer/``: the data layer imports neither of them.
"""

from __future__ import annotations


def prompt_text(processor, question: str) -> str:
    """The chat-formatted prompt for one image and one question (falls back to LLaVA's plain form)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{processor.image_token}\n{question}"
