"""A scripted chat model that supports ``bind_tools`` and ``with_structured_output``.

langchain-core's own fakes (``GenericFakeChatModel``, ``FakeListChatModel``) implement neither, so structured output
cannot be tested with them; like LangGraph's tests, we subclass ``BaseChatModel``. ``BaseChatModel
.with_structured_output`` then works unchanged on top of our ``bind_tools`` (it binds the schema as a tool and parses
the first tool call), whatever ``method`` the caller asks for.

Script items, consumed one per call:
* a pydantic model or a dict: answered as a tool call to the first bound tool (or as JSON text if none is bound);
* a string: a plain text answer;
* an ``AIMessage``: returned as is (e.g. malformed tool calls);
* an exception instance: raised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, Field


class ScriptedChatModel(BaseChatModel):
    script: list[Any] = Field(default_factory=list)
    calls: list[list[BaseMessage]] = Field(default_factory=list)
    """The messages of every call, in order."""
    call_kwargs: list[dict[str, Any]] = Field(default_factory=list)
    """The bound keyword arguments of every call (``tools``, ``tool_choice``, ...)."""

    @property
    def _llm_type(self) -> str:
        return "scripted-fake"

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Any:
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        self.calls.append(list(messages))
        self.call_kwargs.append(dict(kwargs))
        if not self.script:
            raise AssertionError("ScriptedChatModel: the script has no answer left for this call")
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        if isinstance(item, AIMessage):
            message = item
        elif isinstance(item, str):
            message = AIMessage(content=item)
        else:
            args = item.model_dump() if isinstance(item, BaseModel) else dict(item)
            tools = kwargs.get("tools") or []
            if tools:
                name = tools[0]["function"]["name"]
                message = AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": f"call_{len(self.calls)}",
                                                              "type": "tool_call"}])
            else:
                message = AIMessage(content=json.dumps(args))
        return ChatResult(generations=[ChatGeneration(message=message)])
