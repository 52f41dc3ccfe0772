"""One place that builds the chat model used by the locator (vision) and the reasoner (text).

Any OpenAI-compatible server works: OpenAI itself, or a local vLLM / Ollama / llama.cpp server through ``base_url``.
Settings come from arguments first, then the environment (``OPENAI_API_KEY``, ``OPENAI_BASE_URL``,
``LUCIDDRAG_LLM_MODEL``, ``LUCIDDRAG_VISION_MODEL``, ``LUCIDDRAG_STRUCTURED_OUTPUT``, ``LUCIDDRAG_LLM_TIMEOUT``).

Retries: timeouts, connection errors, 408/409/429 and 5xx answers are retried by the ``openai`` client itself,
``max_retries`` times, with exponential backoff (0.5 s doubling to at most 8 s, with jitter) or the server's
``Retry-After`` when it sends one. That client already honours the headers local servers and OpenAI send, so we
configure it instead of wrapping a second retry loop around it. After the last retry the error propagates and the
callers fall back to the offline backends with a warning.
"""

from __future__ import annotations

import os
from typing import Literal

import openai
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, Field, SecretStr

from luciddrag.engine.errors import InputError

StructuredMethod = Literal["json_schema", "function_calling"]

DEFAULT_MODEL = "gpt-4.1-mini"
DEFAULT_TIMEOUT_S = 15.0  # per try; with one retry a dead server costs at most 30 s per call
# Local servers ignore the key but the openai client refuses to start without one.
LOCAL_PLACEHOLDER_KEY = "not-needed"


class LLMSettings(BaseModel):
    """How to reach the chat model. ``from_env`` fills unset fields from the environment."""

    model: str = DEFAULT_MODEL
    vision_model: str | None = None
    """Model for the locator's image messages; None uses ``model`` (most current models read images)."""
    base_url: str | None = None
    """OpenAI-compatible endpoint, e.g. ``http://localhost:8000/v1`` (vLLM), ``http://localhost:11434/v1`` (Ollama)."""
    api_key: SecretStr | None = None
    temperature: float = Field(default=0.7, ge=0.0, le=2.0)
    """Some randomness helps the reasoner propose genuinely different intentions."""
    timeout_s: float = Field(default=DEFAULT_TIMEOUT_S, gt=0)
    """Per request (each retry gets its own); ``LUCIDDRAG_LLM_TIMEOUT``. Short by default: a silent server must not
    block an edit for minutes (the callers fall back to the offline backends with a note)."""
    max_retries: int = Field(default=1, ge=0, le=10)
    structured_output: StructuredMethod = "json_schema"
    """``json_schema`` (OpenAI, vLLM, recent llama.cpp) or ``function_calling`` (servers without JSON-schema mode)."""

    @classmethod
    def from_env(cls, **overrides: object) -> LLMSettings:
        """Settings with every field not given in ``overrides`` (or given as None) read from the environment."""
        given = {k: v for k, v in overrides.items() if v is not None}
        env: dict[str, object] = {}
        if key := os.environ.get("OPENAI_API_KEY"):
            env["api_key"] = key
        if url := (os.environ.get("OPENAI_BASE_URL") or os.environ.get("OPENAI_API_BASE")):
            env["base_url"] = url
        if model := os.environ.get("LUCIDDRAG_LLM_MODEL"):
            env["model"] = model
        if vision := os.environ.get("LUCIDDRAG_VISION_MODEL"):
            env["vision_model"] = vision
        if method := os.environ.get("LUCIDDRAG_STRUCTURED_OUTPUT"):
            env["structured_output"] = method
        if timeout := os.environ.get("LUCIDDRAG_LLM_TIMEOUT"):
            try:
                env["timeout_s"] = float(timeout)
            except ValueError:
                raise InputError(f"LUCIDDRAG_LLM_TIMEOUT={timeout!r} is not a number of seconds") from None
            if not env["timeout_s"] > 0:
                raise InputError(f"LUCIDDRAG_LLM_TIMEOUT={timeout!r} must be a positive number of seconds")
        return cls.model_validate({**env, **given})

    @property
    def configured(self) -> bool:
        """Whether there is anything to talk to: a key (OpenAI) or an explicit server URL (local, keyless)."""
        return self.api_key is not None or self.base_url is not None

    def label(self, vision: bool = False) -> str:
        """A short name for results and logs, e.g. ``gpt-4.1-mini@http://localhost:8000/v1``."""
        model = (self.vision_model or self.model) if vision else self.model
        return f"{model}@{self.base_url}" if self.base_url else model


NO_LLM_NOTICE = (
    "no OPENAI_API_KEY or OPENAI_BASE_URL set: using the offline {what} (set one to use an LLM)"
)


def make_chat_model(settings: LLMSettings, *, vision: bool = False) -> ChatOpenAI:
    """A ChatOpenAI client for the settings (``vision=True`` picks ``vision_model``).

    ``use_responses_api=False``: local servers implement Chat Completions only, and it is the API whose structured
    output and image blocks every OpenAI-compatible server shares.
    """
    if settings.api_key is not None:
        key = settings.api_key
    elif settings.base_url is not None:
        key = SecretStr(LOCAL_PLACEHOLDER_KEY)
    else:
        raise ValueError(NO_LLM_NOTICE.format(what="backend"))
    return ChatOpenAI(
        model=(settings.vision_model or settings.model) if vision else settings.model,
        base_url=settings.base_url,
        api_key=key,
        temperature=settings.temperature,
        timeout=settings.timeout_s,
        max_retries=settings.max_retries,
        use_responses_api=False,
    )


# Errors that mean "the service is unavailable or misbehaving", after the client's own retries: the caller falls
# back to an offline backend. Programming errors (TypeError, ...) are not in the list and still surface.
LLM_SERVICE_ERRORS: tuple[type[BaseException], ...] = (openai.APIError, openai.OpenAIError, TimeoutError,
                                                        ConnectionError)


def describe_llm_error(exc: BaseException) -> str:
    """A one-line account of an LLM failure for a result's warnings (no stack trace, no request body)."""
    status = getattr(exc, "status_code", None)
    kind = type(exc).__name__
    message = str(exc).splitlines()[0] if str(exc) else ""
    if len(message) > 200:
        message = message[:197] + "..."
    return f"{kind}{f' (HTTP {status})' if status else ''}: {message}" if message else kind
