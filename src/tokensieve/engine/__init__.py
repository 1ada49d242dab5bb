"""The hook engine: what runs inside one sieved call, family-independent and torch-only.

Capture of encoder signals from the encoder's own q/k (``capture``), cuts between encoder layers
(``encoder_stage``), token removal between decoder layers (``llm_stage``), placeholder surgery on the prompt
(``placeholders``) and the selection flows shared by the transformers adapters and the vLLM plugin (``anyres``,
``merge_units``). Nothing here imports transformers, so the vLLM environment (another transformers pin) runs it.
"""
