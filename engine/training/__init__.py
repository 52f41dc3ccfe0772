"""Training the quality discriminator (paper §3.2, §4.1): data synthesis (`data`) and the training loop (`train`).

Beside the engine, not part of it: the sampler only needs `luciddrag.engine.discriminator` (the trained model as a
guidance term); nothing in engine/, tools/ or agent/ imports this package.
"""
