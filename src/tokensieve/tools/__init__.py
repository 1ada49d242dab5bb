"""What the command line drives, as importable functions a script or notebook can call too: accuracy evaluation
(``evaluate``, with ``records``, ``calibration`` and ``results``), timing (``bench``, ``measure``), FLOPs (``flops``),
figures (``show``), and the grammar commands share (``configs``, ``inputs``). The commands themselves (argument
checks, terminal output) are :mod:`tokensieve.cli`."""
