"""gpt-oss's built-in `browser` tool (search, open, find), run by the runtime over a pluggable backend.

The model was trained to read pages in one display format and to cite them by cursor and line number, so
this module reproduces the format of OpenAI's reference implementation (gpt_oss/tools/simple_browser):

    [3] Page title (file:///docs/a.html)
    **viewing lines [0 - 12] of 40**

    L0:
    L1: URL: file:///docs/a.html
    L2: # Heading
    L3: Text with a 【0†link】 and one to 【1†another site†example.com】.

Every display gets a new cursor `[n]`; `open(id=k)` follows link k of the page at a cursor; search and
find results are pages of links too. Pages are wrapped at 80 columns and a display shows about 1024 tokens
of them unless the model asks for `num_lines`. Citations `【3†L4-L6】` point at those numbered lines.

Backends: `local:DIR` (files on disk, no network), `exa` and `youcom` (web search APIs, keys from the
environment). Whatever the model writes, `Browser.call` answers with text and never raises.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import textwrap
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Protocol
from urllib.parse import quote, unquote, urlencode, urljoin, urlparse

from gptoss.chat.tokenizer import get_tokenizer
from gptoss.errors import GptossError

VIEW_TOKENS = 1024  # how much of a page one display shows when the model gives no num_lines (as the reference)
LINE_WIDTH = 80  # pages are wrapped to this many columns before lines are numbered
MAX_SEARCH_RESULTS = 20
FIND_MAX_RESULTS, FIND_SHOWN_LINES = 50, 4
HTTP_TIMEOUT = 30.0
VIEW_SOURCE = "view-source:"
LOCAL_SUFFIXES = {".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown", ".txt": "text"}

LINK_RE = re.compile(r"【(\d+)†([^†】]+)(?:†[^†】]+)?】")  # a link as pages show it: 【id†text】 or 【id†text†domain】
CITATION_RE = re.compile(r"【(\d{1,9})†([^†】]+)(?:†[^†】]+)?】")  # what the model writes: 【cursor†L4-L6】
LINE_RANGE_RE = re.compile(r"L(\d{1,9})(?:-L(\d{1,9}))?")
INTEGER_RE = re.compile(r"\s*-?\d{1,9}\s*")  # an integer the model wrote as a string (a link id, a line)
# Page text must not contain the brackets links and citations are made of (the reference swaps them too).
BRACKETS = str.maketrans({"【": "〖", "】": "〗"})


class BrowserError(GptossError):
    """A browser backend that cannot be set up (a missing folder or API key), or a web API that failed."""


@dataclass(frozen=True)
class SearchResult:
    url: str
    title: str
    snippet: str


@dataclass(frozen=True)
class Page:
    """A page as plain text / markdown, its links already rendered as 【id†text】, their urls in `links`."""

    url: str
    title: str
    text: str
    links: dict[int, str] = field(default_factory=dict)


class Backend(Protocol):
    name: str  # "local", "exa", "youcom"
    external: bool  # True when it reads the web; a client can ask for a browser without web access

    def search(self, query: str, topn: int) -> list[SearchResult]: ...

    def fetch(self, url: str) -> Page: ...  # raises (LookupError, BrowserError, ...) when it has no such page


# --- Turning documents into pages ---------------------------------------------------------------------------


class _LinkTable:
    """Numbers a page's links in order of first appearance (one id per url) and renders them as 【id†text】."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.ids: dict[str, int] = {}

    def render(self, href: str, text: str) -> str:
        text = " ".join(text.split()).replace("†", "‡")
        if not text or href.startswith(("#", "mailto:", "javascript:")):
            return text  # an anchor on the same page or a link the browser cannot follow is just its text
        url = urljoin(self.base_url, href.strip())
        target = urlparse(url)
        if target.scheme not in ("http", "https", "file"):
            return text
        link_id = self.ids.setdefault(url, len(self.ids))
        if target.netloc == urlparse(self.base_url).netloc:
            return f"【{link_id}†{text}】"
        return f"【{link_id}†{text}†{target.netloc}】"  # links to other sites name the site, as the reference

    def by_id(self) -> dict[int, str]:
        return {link_id: url for url, link_id in self.ids.items()}


class _HtmlToText(HTMLParser):
    """HTML to markdown-like text: headings as '# ...', blocks as line breaks, links through a _LinkTable."""

    SKIPPED = {"script", "style", "noscript", "template", "svg"}
    PARAGRAPHS = {"p", "pre", "blockquote", "table", "hr", "figure"}
    LINES = {"div", "section", "article", "header", "footer", "nav", "main", "aside", "form", "tr", "ul", "ol", "dl",
             "dt", "dd", "figcaption", "address", "br"}

    def __init__(self, links: _LinkTable):
        super().__init__(convert_charrefs=True)
        self.links, self.title = links, ""
        self.out: list[str] = []
        self.skipping = self.pre = self.images = 0
        self.in_title = False
        self.link: tuple[str, list[str]] | None = None  # the <a href> being read: its href and text so far

    def _write(self, text: str) -> None:
        (self.link[1] if self.link else self.out).append(text)

    def _after_space(self) -> bool:
        """Whether the text so far ends with whitespace (or is empty), so more whitespace would be too much."""
        written = "".join((self.link[1] if self.link else self.out)[-3:])
        return not written or written[-1].isspace()

    def _break(self, newlines: int) -> None:
        """Ends the line (1) or the paragraph (2) unless it already is; inside a link, just a space."""
        if self.link:
            self._write(" ")
            return
        written = "".join(self.out[-4:])
        self._write("\n" * max(0, newlines - written[len(written.rstrip()):].count("\n")))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag in self.SKIPPED:
            self.skipping += 1
        elif self.skipping:  # inside a script, a style, an svg...
            return
        elif tag == "title":
            self.in_title = True
        elif tag == "a":
            self._end_link()
            href = attributes.get("href")
            self.link = (href, []) if href else None
        elif tag == "img":
            name = attributes.get("alt") or attributes.get("title")
            self._write(f"[Image {self.images}: {name}]" if name else f"[Image {self.images}]")
            self.images += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._break(2)
            self._write("#" * int(tag[1]) + " ")
        elif tag == "li":
            self._break(1)
            self._write("  * ")
        elif tag in ("td", "th") and not self._after_space():
            self._write(" ")
        elif tag in self.PARAGRAPHS or tag in self.LINES:
            self._break(2 if tag in self.PARAGRAPHS else 1)
            self.pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif self.skipping:
            return
        elif tag == "title":
            self.in_title = False
        elif tag == "a":
            self._end_link()
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.PARAGRAPHS:
            self._break(2)
            self.pre = max(0, self.pre - (tag == "pre"))
        elif tag in self.LINES and tag != "br":
            self._break(1)

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        if self.in_title:
            self.title += data
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self._after_space():
                data = data.lstrip()
        self._write(data)

    def _end_link(self) -> None:
        if self.link:
            href, text = self.link
            self.link = None
            self._write(self.links.render(href, "".join(text)))

    def text(self) -> str:
        self._end_link()
        return "".join(self.out)


def _tidy(text: str) -> str:
    """Drops trailing spaces and runs of blank lines, which documents are full of."""
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def _markdown_body(text: str, links: _LinkTable) -> str:
    """Markdown stays as it is, except that [text](url) becomes a numbered link and ![alt](src) an image."""
    images = itertools.count()

    def replace(match: re.Match) -> str:
        bang, label, href = match.groups()
        if bang:
            return f"[Image {next(images)}: {label}]" if label else f"[Image {next(images)}]"
        return links.render(href, label)

    return re.sub(r"(!?)\[([^\]\n]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", replace, text)


def document_page(source: str, url: str, kind: str = "html", title: str | None = None,
                  fallback_title: str = "") -> Page:
    """A Page from a document's source (`kind`: html, markdown or text).

    Its title is `title`, else the HTML <title>, else the first '# ' heading, else `fallback_title`. Like
    the reference's pages, the text starts with the page's URL (so line L1 says where the page is from).
    """
    source, links = source.translate(BRACKETS), _LinkTable(url)
    if kind == "html":
        parser = _HtmlToText(links)
        parser.feed(source)
        parser.close()
        body, title = parser.text(), title or " ".join(parser.title.split())
    else:
        body = _markdown_body(source, links) if kind == "markdown" else source
    body = _tidy(body)
    heading = re.search(r"^# +(.+)$", body, re.MULTILINE)
    title = title or (heading and heading[1].strip()) or fallback_title
    return Page(url=url, title=title, text=f"\nURL: {url}\n{body}", links=links.by_id())


def source_page(source: str, url: str, title: str = "") -> Page:
    """What open(view_source=true) shows: the document's raw source, without links."""
    return Page(url=VIEW_SOURCE + url, title=title or url, text=source.translate(BRACKETS))


def strip_links(text: str) -> str:
    """'a 【3†link】 b' -> 'a link b' (keeps line breaks inside a link, so line numbers stay the same)."""
    return LINK_RE.sub(lambda m: m[2], text)


def wrap_lines(text: str, width: int = LINE_WIDTH) -> list[str]:
    """The page's lines as the display numbers them: long lines wrapped, blank lines kept."""
    return [wrapped for line in text.split("\n")
            for wrapped in (textwrap.wrap(line, width, replace_whitespace=False, drop_whitespace=False) or [""])]


# --- Backends -----------------------------------------------------------------------------------------------


class LocalBackend:
    """Pages from a folder: every .html/.htm/.md/.markdown/.txt file under it, searched with BM25.

    A file's URL is file:// and its absolute path; open also takes the path relative to the folder. Only
    the files found when the backend was made can be opened, so the model cannot read anything else.
    """

    name, external = "local", False

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise BrowserError(f"browser folder {folder} does not exist or is not a directory")
        self.pages: dict[Path, Page] = {}
        for path in sorted(self.folder.rglob("*")):
            kind = LOCAL_SUFFIXES.get(path.suffix.lower())
            if kind and path.is_file():
                try:
                    source = path.read_text(errors="replace")
                except OSError as e:
                    raise BrowserError(f"cannot read {path} for the browser: {e}") from e
                self.pages[path] = document_page(source, path.as_uri(), kind, fallback_title=path.name)
        self.terms = {path: Counter(_words(page.title + " " + strip_links(page.text)))
                      for path, page in self.pages.items()}

    def search(self, query: str, topn: int) -> list[SearchResult]:
        """BM25 over lowercase word tokens of title and text; ties go to the first path, so results are stable."""
        words = set(_words(query))
        if not self.pages or not words:
            return []
        mean_length = sum(terms.total() for terms in self.terms.values()) / len(self.terms) or 1
        documents_with = {word: sum(word in terms for terms in self.terms.values()) for word in words}
        idf = {word: math.log(1 + (len(self.terms) - df + 0.5) / (df + 0.5))
               for word, df in documents_with.items() if df}
        k1, b = 1.5, 0.75
        scores = {}
        for path, terms in self.terms.items():
            norm = k1 * (1 - b + b * terms.total() / mean_length)
            scores[path] = sum(weight * terms[w] * (k1 + 1) / (terms[w] + norm) for w, weight in idf.items())
        ranked = sorted((path for path in scores if scores[path] > 0), key=lambda path: (-scores[path], path))
        return [SearchResult(self.pages[p].url, self.pages[p].title, _snippet(self.pages[p], words))
                for p in ranked[:topn]]

    def fetch(self, url: str) -> Page:
        view_source = url.startswith(VIEW_SOURCE)
        reference = url.removeprefix(VIEW_SOURCE)
        if reference.startswith("file://"):
            path = Path(unquote(urlparse(reference).path))
        else:
            path = self.folder / reference.split("#")[0]
        path = Path(os.path.normpath(path))  # 'a/../b.html' is b.html; '../x' is outside, so not a page
        if path not in self.pages:
            raise LookupError(f"no page at {url} in {self.folder}")
        if view_source:
            return source_page(path.read_text(errors="replace"), self.pages[path].url, self.pages[path].title)
        return self.pages[path]


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _snippet(page: Page, words: set[str], limit: int = 200) -> str:
    """The first line of text (not a heading) that holds a query word, else the first line of text."""
    lines = [" ".join(line.split()) for line in strip_links(page.text).split("\n")[2:]]  # [2:]: after the URL
    lines = [line for line in lines if line and not line.startswith("#")] or [""]
    line = next((line for line in lines if words & set(_words(line))), lines[0])
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _http_json(url: str, headers: dict[str, str], payload: dict | None = None,
               timeout: float = HTTP_TIMEOUT) -> dict | list:
    """GET `url` (no payload) or POST `payload` as JSON; the answer's JSON. The one call that reaches the web."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json", **headers},
                                     method="GET" if payload is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.load(response)
    except urllib.error.HTTPError as e:
        body = e.read(300).decode(errors="replace")
        raise BrowserError(f"{urlparse(url).netloc} answered HTTP {e.code}: {body}") from e


def _web_page(url: str, html: str, title: str) -> Page:
    """The page a web API returned for `url` (or its source, for a view-source: url)."""
    address = url.removeprefix(VIEW_SOURCE)
    if url.startswith(VIEW_SOURCE):
        return source_page(html, address, title)
    return document_page(html, address, title=title, fallback_title=urlparse(address).netloc)


def _api_key(variable: str, backend: str) -> str:
    key = os.environ.get(variable)
    if not key:
        raise BrowserError(f"the {backend} browser backend needs an API key: set the environment variable {variable}")
    return key


class _WebBackend:
    """A search API on the web: its key from the environment variable `KEY_VARIABLE`."""

    name: str
    KEY_VARIABLE: str
    external = True

    def __init__(self, timeout: float = HTTP_TIMEOUT):
        self.headers = {"x-api-key": _api_key(self.KEY_VARIABLE, self.name), "user-agent": "gptoss"}
        self.timeout = timeout


class ExaBackend(_WebBackend):
    """Web search and page contents from the Exa API (https://exa.ai), key in EXA_API_KEY."""

    name, KEY_VARIABLE = "exa", "EXA_API_KEY"
    BASE_URL = "https://api.exa.ai"

    def search(self, query: str, topn: int) -> list[SearchResult]:
        payload = {"query": query, "numResults": topn, "contents": {"text": True, "summary": True}}
        data = _http_json(f"{self.BASE_URL}/search", self.headers, payload, self.timeout)
        return [SearchResult(r["url"], r.get("title") or r["url"], r.get("summary") or "")
                for r in data.get("results", [])]

    def fetch(self, url: str) -> Page:
        address = url.removeprefix(VIEW_SOURCE)
        payload = {"urls": [address], "text": {"includeHtmlTags": True}}
        results = _http_json(f"{self.BASE_URL}/contents", self.headers, payload, self.timeout).get("results")
        if not results:
            raise LookupError(f"Exa returned no contents for {address}")
        return _web_page(url, results[0].get("text") or "", results[0].get("title") or "")


class YouComBackend(_WebBackend):
    """Web search and page contents from the You.com API (https://you.com/platform), key in YDC_API_KEY."""

    name, KEY_VARIABLE = "youcom", "YDC_API_KEY"
    BASE_URL = "https://api.ydc-index.io"

    def search(self, query: str, topn: int) -> list[SearchResult]:
        url = f"{self.BASE_URL}/v1/search?{urlencode({'query': query, 'count': topn})}"
        results = _http_json(url, self.headers, timeout=self.timeout).get("results", {})
        found = [(r, r.get("snippets")) for r in results.get("web", [])]
        found += [(r, r.get("description")) for r in results.get("news", [])]
        return [SearchResult(r["url"], r.get("title") or r["url"], " ".join(s) if isinstance(s, list) else s or "")
                for r, s in found]

    def fetch(self, url: str) -> Page:
        address = url.removeprefix(VIEW_SOURCE)
        payload = {"urls": [address], "livecrawl_formats": "html"}
        data = _http_json(f"{self.BASE_URL}/v1/contents", self.headers, payload, self.timeout)
        if not data or not data[0].get("html"):
            raise LookupError(f"You.com returned no HTML for {address}")
        return _web_page(url, data[0]["html"], data[0].get("title") or "")


def backend_from_spec(spec: str) -> Backend:
    """'local:DIR', 'exa' or 'youcom' (as given to `gptoss serve --browser`) -> a backend."""
    if spec.startswith("local:") and spec != "local:":
        return LocalBackend(spec.removeprefix("local:"))
    if spec == "exa":
        return ExaBackend()
    if spec == "youcom":
        return YouComBackend()
    raise BrowserError(f"unknown browser backend {spec!r}: use local:DIR (a folder of pages), exa or youcom")


# --- The tool -----------------------------------------------------------------------------------------------


class _UsageError(Exception):
    """A mistake of the model's (bad argument, unknown link...): its message is the tool's answer."""


@dataclass
class _Display:
    """A page as the browser showed it: its numbered lines, and what kind of page it is."""

    page: Page
    kind: str = "page"  # "page", "search" or "find" (results pages cannot be searched with find)
    origin: Page | None = None  # find results: the page they were found in (what citations point at)
    link_lines: dict[int, int] = field(default_factory=dict)  # find results: link id -> line of the match
    lines: list[str] = field(init=False)  # as the display numbers them

    def __post_init__(self) -> None:
        self.lines = wrap_lines(self.page.text)


class Browser:
    """The browser of one conversation: runs the model's calls and remembers each display by its cursor."""

    def __init__(self, backend: Backend, view_tokens: int = VIEW_TOKENS):
        self.backend, self.view_tokens = backend, view_tokens
        self.displays: list[_Display] = []  # by cursor
        self.fetched: dict[str, Page] = {}  # by url, so following a link twice does not fetch it twice
        self.last_action: dict | None = None  # the last call as a Responses `web_search_call` action; None: failed

    def call(self, function: str, arguments: str) -> str:
        """Runs browser.`function` with the JSON `arguments` the model wrote; the text the model sees."""
        self.last_action = None
        run = {"search": self._search, "open": self._open, "find": self._find}.get(function.removeprefix("browser."))
        try:
            if run is None:
                raise _UsageError(f"Unknown function `{function}`: the browser has search, open and find.")
            return run(_parse_arguments(arguments))
        except _UsageError as e:
            return _truncate(str(e))

    def _search(self, args: dict) -> str:
        query = _str_arg(args, "query")
        topn = min(max(_int_arg(args, "topn", _int_arg(args, "top_n", 10)), 1), MAX_SEARCH_RESULTS)
        try:
            results = self.backend.search(query, topn)
        except Exception as e:  # whatever a backend does wrong is the model's answer, not the server's problem
            raise _UsageError(f"Error during search for `{_truncate(query)}`: {_describe(e)}") from e
        links = _LinkTable("")  # no page url: every web result names its site, as in the reference
        items = [f"  * {links.render(r.url, (r.title or r.url).translate(BRACKETS))} "
                 f"{' '.join(r.snippet.split()).translate(BRACKETS)}".rstrip() for r in results]
        text = "# Search Results\n\n" + ("\n".join(items) or f"No results for `{query}`.")
        display = self._show(_Display(Page(url="", title=query, text=text, links=links.by_id()), kind="search"))
        self.last_action = {"type": "search", "query": query,
                            "sources": [{"type": "url", "url": r.url} for r in results]}
        return display

    def _open(self, args: dict) -> str:
        loc, num_lines = _int_arg(args, "loc", -1), _int_arg(args, "num_lines", -1)
        view_source = args.get("view_source") or False
        if not isinstance(view_source, bool):
            raise _UsageError(f"`view_source` must be true or false, not {_truncate(json.dumps(view_source))}.")
        source = VIEW_SOURCE if view_source else ""
        target = args.get("id", -1)
        if isinstance(target, str) and not INTEGER_RE.fullmatch(target):  # a URL: fetched anew, like a reload
            display = self._show(_Display(self._fetch(source + target, reload=True)), max(loc, 0), num_lines)
        else:
            link_id, cursor = _int_arg(args, "id", -1), _int_arg(args, "cursor", -1)
            shown = self._display_at(cursor)
            if link_id < 0 and not view_source:  # scroll: the same page at a new cursor
                self._check_loc(shown.lines, loc)
                self.displays.append(shown)
                display = self._render(shown, max(loc, 0), num_lines)
            elif link_id < 0:
                display = self._show(_Display(self._fetch(source + shown.page.url)), max(loc, 0), num_lines)
            elif link_id in shown.page.links:  # a find result opens its page a few lines above the match
                near_match = max(0, shown.link_lines.get(link_id, 0) - FIND_SHOWN_LINES)
                page = self._fetch(source + shown.page.links[link_id])
                display = self._show(_Display(page), loc if loc >= 0 else near_match, num_lines)
            else:
                raise _UsageError(f"Invalid link id `{link_id}` for the page at cursor {cursor}.")
        self.last_action = {"type": "open_page", "url": self.displays[-1].page.url.removeprefix(VIEW_SOURCE)}
        return display

    def _find(self, args: dict) -> str:
        pattern = _str_arg(args, "pattern")
        shown = self._display_at(_int_arg(args, "cursor", -1))
        if shown.kind != "page":
            raise _UsageError("Cannot run `find` on a search results page or a find results page.")
        lines = strip_links("\n".join(shown.lines)).split("\n")
        chunks, link_lines, n = [], {}, 0
        while n < len(lines) and len(chunks) < FIND_MAX_RESULTS:
            if pattern.lower() not in lines[n].lower():
                n += 1
                continue
            link_lines[len(chunks)] = n
            chunks.append(f"# 【{len(chunks)}†match at L{n}】\n" + "\n".join(lines[n:n + FIND_SHOWN_LINES]))
            n += FIND_SHOWN_LINES
        page = shown.page
        results = Page(url=f"{page.url}/find?pattern={quote(pattern)}",
                       title=f"Find results for text: `{pattern}` in `{page.title}`",
                       text="\n\n".join(chunks) or f"No `find` results for pattern: `{pattern}`",
                       links={i: page.url for i in link_lines})
        display = self._show(_Display(results, kind="find", origin=page, link_lines=link_lines))
        self.last_action = {"type": "find_in_page", "pattern": pattern, "url": page.url}
        return display

    def _fetch(self, url: str, reload: bool = False) -> Page:
        if not reload and url in self.fetched:
            return self.fetched[url]
        try:
            page = self.backend.fetch(url)
        except Exception as e:  # an unknown page or a failing backend: the model reads why and can go on
            raise _UsageError(f"Error fetching URL `{_truncate(url)}`: {_describe(e)}") from e
        self.fetched[url] = self.fetched[page.url] = page
        return page

    def _display_at(self, cursor: int) -> _Display:
        if not self.displays:
            raise _UsageError("No pages to access! Search or open a URL first.")
        if cursor == -1:
            return self.displays[-1]
        if not 0 <= cursor < len(self.displays):
            raise _UsageError(f"Cursor `{cursor}` is out of range. "
                              f"Available cursor indices: [0 - {len(self.displays) - 1}].")
        return self.displays[cursor]

    @staticmethod
    def _check_loc(lines: list[str], loc: int) -> None:
        if loc >= len(lines):
            raise _UsageError(f"Invalid location parameter: `{loc}`. Cannot exceed page maximum of {len(lines) - 1}.")

    def _show(self, shown: _Display, loc: int = 0, num_lines: int = -1) -> str:
        """Gives a new display the next cursor and renders it from line `loc`."""
        self._check_loc(shown.lines, loc)
        self.displays.append(shown)
        return self._render(shown, loc, num_lines)

    def _render(self, shown: _Display, loc: int, num_lines: int) -> str:
        """The display at the newest cursor: header, scrollbar and numbered lines loc..end."""
        end = self._end_of_view(shown.lines, loc, num_lines)
        body = "\n".join(f"L{n}: {line}" for n, line in enumerate(shown.lines[loc:end], loc))
        where = f" ({_truncate(unquote(shown.page.url))})" if shown.page.url else ""
        title = " ".join(shown.page.title.split())  # one header line, whatever a web API called the page
        return (f"[{len(self.displays) - 1}] {title}{where}\n"
                f"**viewing lines [{loc} - {end - 1}] of {len(shown.lines) - 1}**\n\n{body}")

    def _end_of_view(self, lines: list[str], loc: int, num_lines: int) -> int:
        """Where a display from `loc` ends: after num_lines lines, else after about view_tokens tokens."""
        if num_lines > 0:
            return min(loc + num_lines, len(lines))
        numbered = [f"L{n}: {line}\n" for n, line in enumerate(lines[loc:], loc)]
        if sum(map(len, numbered)) <= self.view_tokens:  # a token has at least one character: it all fits
            return len(lines)
        tokenizer, used = get_tokenizer(), 0
        for count, line in enumerate(numbered, 1):
            used += len(tokenizer.encode(line, disallowed_special=()))
            if used >= self.view_tokens:  # the line that crosses the budget is shown whole
                return loc + count
        return len(lines)

    def cited_lines(self, cursor: int, start: int, end: int | None = None) -> str:
        """Lines start..end (inclusive, as the display numbered them) of the display at `cursor`.

        Raises LookupError for a cursor this browser never showed; lines past the page's end are just absent.
        """
        if not 0 <= cursor < len(self.displays):
            raise LookupError(f"no display at cursor {cursor}")
        return "\n".join(self.displays[cursor].lines[max(start, 0):(start if end is None else end) + 1])

    def normalize_citations(self, text: str) -> tuple[str, list[dict]]:
        """Replaces each citation 【cursor†L4-L6】 of a page this browser showed by ' ([domain](url))'.

        Returns the new text and its `url_citation` annotations (indices into the new text, spanning the
        marker without its leading space). A citation of search results points at the result it quotes;
        citations of unknown cursors or of nothing citable are left as they are.
        """
        out, annotations, last = "", [], 0
        for match in CITATION_RE.finditer(text):
            target = self._citation_target(int(match[1]), match[2])
            if target is None:
                continue
            url, title = target
            out += text[last:match.start()]
            out += " " if out and not out[-1].isspace() else ""
            marker = f"([{_site(url)}]({url}))"
            annotations.append({"type": "url_citation", "start_index": len(out), "end_index": len(out) + len(marker),
                                "url": url, "title": title})
            out += marker
            last = match.end()
        return out + text[last:], annotations

    def _citation_target(self, cursor: int, content: str) -> tuple[str, str] | None:
        """The (url, title) a citation points at, or None."""
        if not 0 <= cursor < len(self.displays):
            return None
        shown = self.displays[cursor]
        if shown.kind == "search":  # the first result link in the cited lines
            lines = LINE_RANGE_RE.fullmatch(content)
            link = lines and LINK_RE.search(self.cited_lines(cursor, int(lines[1]), int(lines[2] or lines[1])))
            return (shown.page.links[int(link[1])], link[2]) if link and int(link[1]) in shown.page.links else None
        page = shown.origin or shown.page
        return (page.url.removeprefix(VIEW_SOURCE), page.title) if page.url else None


def _parse_arguments(arguments: str) -> dict:
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError) as e:
        raise _UsageError(f"Invalid function arguments: not a JSON object ({e}).") from e
    if not isinstance(parsed, dict):
        raise _UsageError("Invalid function arguments: expected a JSON object.")
    return parsed


def _int_arg(args: dict, key: str, default: int) -> int:
    """An integer argument; the model sometimes writes 3.0 or "3", which mean 3."""
    value = args.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INTEGER_RE.fullmatch(value):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _UsageError(f"`{key}` must be an integer, not {_truncate(json.dumps(value))}.")


def _str_arg(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value.strip():
        raise _UsageError(f"`{key}` must be a non-empty string, not {_truncate(json.dumps(value))}.")
    return value


def _describe(error: Exception) -> str:
    return _truncate(str(error) or type(error).__name__)


def _truncate(text: str, limit: int = 1024) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _site(url: str) -> str:
    """What a citation marker shows: the site, or for a local file its name."""
    parts = urlparse(url)
    return parts.netloc or PurePosixPath(unquote(parts.path)).name or url
