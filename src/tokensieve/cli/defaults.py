"""Defaults the parser's help texts show and the commands use: one place, importable without torch."""

GENERIC_QUESTION = "What is in the picture?"
"""The question ``run`` and ``bench`` ask of a model other than the embedded default."""
EVAL_METHODS = "evocut,random,pool"
EVAL_BUDGETS = "0.5,0.25,0.125,0.0625"
"""What ``tokensieve eval`` compares when no --methods / --budgets are given."""
