"""Offline evals of the agent: a case set as data, record/replay LLM cassettes, metrics and graph trajectories."""
