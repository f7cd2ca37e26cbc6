"""The built-in tools of one conversation, as the model sees them and as the runtime runs them.

gpt-oss was trained with two tools of its own, described in the system message rather than the developer
message: `browser` (functions search, open and find; `gptoss.tools.browser`) and `python` (a stateful
interpreter; `gptoss.tools.python_sandbox`). The model calls them on the analysis channel, the runtime
runs the call and puts the answer back into the conversation, and the model goes on within the same turn.
"""

from __future__ import annotations

import functools
import urllib.parse
from dataclasses import dataclass

from openai_harmony import ToolNamespaceConfig

from gptoss.chat.harmony import FunctionTool, TextInput
from gptoss.tools.browser import Backend, Browser, Page, SearchResult
from gptoss.tools.python_sandbox import PythonSandbox

BROWSER = "browser"
PYTHON = "python"
PYTHON_TOOL = FunctionTool("", namespace=PYTHON, text_input=TextInput(), builtin=True)


@functools.cache
def browser_functions() -> tuple[FunctionTool, ...]:
    """search, open and find, with the argument schemas openai-harmony describes them with."""
    return tuple(FunctionTool(t.name, t.description, t.parameters, namespace=BROWSER, builtin=True)
                 for t in ToolNamespaceConfig.browser().tools)


def python_config(timeout_s: float) -> ToolNamespaceConfig:
    """openai-harmony's description of the python tool, told what this sandbox is: its time limit, its
    working folder instead of a /mnt/data drive, and no network."""
    text = ToolNamespaceConfig.python().description
    text = text.replace("120.0 seconds", f"{timeout_s:g} seconds")
    text = text.replace("The drive at '/mnt/data' can be used to save and persist user files.",
                        "Files written to the current directory persist for the session.")
    text = text.replace("Internet access for this session is UNKNOWN. Depends on the cluster.",
                        "Internet access for this session is disabled.")
    return ToolNamespaceConfig(name=PYTHON, description=text, tools=[])


class FilteredBackend:
    """A browser backend seen through a request's web_search settings: at most `max_results` results
    a search, and only pages of `allowed_domains` (and their subdomains) when given."""

    def __init__(self, backend: Backend, allowed_domains: list[str] | None = None, max_results: int | None = None):
        self.backend, self.max_results = backend, max_results
        self.allowed = [d.lower().strip(".") for d in allowed_domains or []]
        self.name, self.external = backend.name, backend.external

    def allows(self, url: str) -> bool:
        host = (urllib.parse.urlsplit(url).hostname or "").lower()
        return not self.allowed or any(host == d or host.endswith("." + d) for d in self.allowed)

    def search(self, query: str, topn: int) -> list[SearchResult]:
        results = [r for r in self.backend.search(query, topn) if self.allows(r.url)]
        return results[:self.max_results] if self.max_results else results

    def fetch(self, url: str) -> Page:
        if not self.allows(url):
            raise LookupError(f"{url} is outside the domains this search may use ({', '.join(self.allowed)})")
        return self.backend.fetch(url)


@dataclass
class BuiltinTools:
    """The built-in tools one conversation may use (None: not offered) and their state."""

    browser: Browser | None = None
    python: PythonSandbox | None = None

    def functions(self) -> list[FunctionTool]:
        """What the model may call, for the output rules (`gptoss.chat.grammar`)."""
        return [*(browser_functions() if self.browser else ()), *([PYTHON_TOOL] if self.python else [])]

    def configs(self) -> list[ToolNamespaceConfig]:
        """What the system message describes (`Chat(builtin_tools=...)`)."""
        return [*([ToolNamespaceConfig.browser()] if self.browser else []),
                *([python_config(self.python.limits.timeout_s)] if self.python else [])]

    def handles(self, recipient: str | None) -> bool:
        return bool(recipient) and (recipient.startswith(BROWSER + ".") and self.browser is not None
                                    or recipient == PYTHON and self.python is not None)

    def run(self, recipient: str, text: str) -> str:
        """Runs a call the model addressed to `recipient` with `text` (JSON for the browser, code for python);
        returns what the tool answers. Neither tool raises for what the model wrote."""
        if recipient == PYTHON and self.python is not None:
            return self.python.run(text)
        if recipient.startswith(BROWSER + ".") and self.browser is not None:
            return self.browser.call(recipient.removeprefix(BROWSER + "."), text)
        return f"Error: there is no tool {recipient!r} in this conversation."
