"""`luciddrag`: the one command-line package (edit, demo, chat, web, bench, eval, train, prompts, discriminator).

The top layer: it may import everything below it (agent, tools, engine, evals, training); nothing imports it.
"""

from luciddrag.agent.cli.main import app, main

__all__ = ["app", "main"]
