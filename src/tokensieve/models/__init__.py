"""Models tokensieve ships or builds: the embedded default models and their loading (``loading``), tiny
random-weight models for tests (``tiny``) and real-size random-weight architectures for speed studies (``archs``)."""
