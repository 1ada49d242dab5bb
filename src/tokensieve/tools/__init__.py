"""What the command line runs, as importable functions: accuracy evaluation (``evaluate``), timing (``bench``,
``measure``), FLOPs (``flops``), figures (``show``) and the shared argument grammar (``configs``, ``inputs``)."""
