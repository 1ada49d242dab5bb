"""What the command line runs, as importable functions, and each command's body next to it: accuracy evaluation
(``evaluate``, with ``records``, ``calibration`` and ``results``), timing (``bench``, ``measure``), FLOPs (``flops``),
figures (``show``), one question (``run``), the methods and the demo model (``catalog``), and what the commands share
(``configs``, ``inputs``, ``console``)."""
