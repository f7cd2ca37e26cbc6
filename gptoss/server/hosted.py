"""The Responses API's hosted tools, served by gpt-oss's own: `web_search` by the browser tool and
`code_interpreter` by the python tool (`gptoss.tools`), run by the server inside a response.

What the server runs is what it was started with (`gptoss serve --browser-backend ...`, `--python-tool`);
a request that asks for a hosted tool the server does not run gets a response without it and a warning
saying why, not an error: the model simply is not offered the tool. Python sandboxes live per
conversation: a conversation is named by `prompt_cache_key` (coding agents send one per session), else
by the first response of a `previous_response_id` chain.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gptoss.server.schemas import CodeInterpreterToolSpec, ResponsesRequest, WebSearchToolSpec
from gptoss.tools.browser import Backend, Browser
from gptoss.tools.builtin import BuiltinTools, FilteredBackend
from gptoss.tools.python_sandbox import PythonSessions

# Results a search shows for the web_search tool's search_context_size.
RESULTS_FOR_CONTEXT_SIZE = {"low": 3, "medium": 5, "high": 10}
REMEMBERED_CONVERSATIONS = 4096  # response id -> conversation, for previous_response_id chains


@dataclass
class HostedTools:
    """The hosted tools this server runs: a browser backend (None: web_search is not offered) and python
    sandboxes (None: code_interpreter is not offered)."""

    browser_backend: Backend | None = None
    python: PythonSessions | None = None

    def __post_init__(self):
        self._conversation_of: OrderedDict[str, str] = OrderedDict()

    def conversation(self, body: ResponsesRequest, response_id: str) -> str:
        """The conversation response `response_id` belongs to (see the module's docstring)."""
        key = body.prompt_cache_key or self._conversation_of.get(body.previous_response_id or "", response_id)
        self._conversation_of[response_id] = key
        while len(self._conversation_of) > REMEMBERED_CONVERSATIONS:
            self._conversation_of.popitem(last=False)
        return key

    def for_request(self, body: ResponsesRequest, conversation: str) -> tuple[BuiltinTools, list[str]]:
        """The built-in tools that serve the request's hosted tools, and a warning for each one not served."""
        tools, warnings = BuiltinTools(), []
        for spec in body.tools or []:
            if isinstance(spec, WebSearchToolSpec):
                backend = self.browser_backend
                if backend is None:
                    warnings.append(f"{spec.type}: this server has no browser backend (gptoss serve --browser-backend "
                                    f"local:DIR|exa|youcom), so the tool was not offered to the model")
                elif spec.external_web_access is False and backend.external:
                    warnings.append(f"{spec.type}: external_web_access is false and this server's browser backend "
                                    f"({backend.name}) reads the web, so the tool was not offered to the model")
                else:
                    domains = spec.filters.allowed_domains if spec.filters else None
                    results = RESULTS_FOR_CONTEXT_SIZE[spec.search_context_size or "medium"]
                    tools.browser = Browser(FilteredBackend(backend, domains, results))
            elif isinstance(spec, CodeInterpreterToolSpec):
                if self.python is None:
                    warnings.append("code_interpreter: the python tool is off on this server (gptoss serve "
                                    "--python-tool turns it on), so the tool was not offered to the model")
                else:
                    tools.python = self.python.get(conversation)
        return tools, warnings

    def close(self) -> None:
        if self.python is not None:
            self.python.close_all()
