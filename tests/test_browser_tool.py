"""The `browser` tool over a folder of pages, and the web backends with their HTTP call replaced: no network."""

from __future__ import annotations

import json
import re

import pytest

from gptoss.chat.tokenizer import get_tokenizer
from gptoss.tools import browser
from gptoss.tools.browser import (Browser, BrowserError, ExaBackend, LocalBackend, Page, SearchResult, YouComBackend,
                                  backend_from_spec, document_page)

GUIDE = """<html><head><title>Garden guide</title><style>p { color: green }</style></head><body>
<h1>Growing tomatoes</h1>
<p>Tomatoes need   full sun and <b>deep</b> watering. Read about <a href="pests.html">garden pests</a>
or buy seeds from <a href="https://seeds.example.org/tomato">a seed shop</a>. <a href="#top">Back to top</a>.</p>
<ul><li>Stake the plants early.</li><li>Pinch the side shoots.</li></ul>
<p>A very long sentence about compost, mulch, crop rotation, companion planting, pruning, and harvesting
that goes on well past eighty columns so that the browser has to wrap it.</p>
<p>Fish &amp; chips, and a fake link 【9†fake】.</p>
</body></html>"""

PESTS = """<html><head><title>Garden pests</title><script>var aphids = "in a script";</script></head><body>
<h2>Aphids</h2>
<p>Aphids suck sap from tomato leaves.</p>
<p>Ladybugs eat aphids, so invite ladybugs into the garden.</p>
<div>Go back to the <a href="index.html">garden guide</a>.</div>
</body></html>"""

NOTES = """# Watering notes

Water in the morning. See [the guide](index.html) and ![a can](can.png).
Rain barrels help in dry summers.
"""


@pytest.fixture
def site(tmp_path):
    (tmp_path / "index.html").write_text(GUIDE)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "pests.html").write_text(PESTS.replace("index.html", "../index.html"))
    (tmp_path / "pests.html").write_text(PESTS)
    (tmp_path / "notes.md").write_text(NOTES)
    (tmp_path / "ignored.json").write_text('{"aphids": "ladybugs"}')
    return tmp_path


@pytest.fixture
def tool(site):
    return Browser(LocalBackend(site))


def url_of(path) -> str:
    return path.resolve().as_uri()


def numbered(display: str) -> dict[int, str]:
    """The display's lines by their L-number."""
    return {int(m[1]): m[2] for m in re.finditer(r"^L(\d+): (.*)$", display, re.MULTILINE)}


def line_of(lines: dict[int, str], text: str) -> int:
    """The L-number of the line that is `text` (page lines move with the URL line, which wraps at 80 columns)."""
    return next(n for n, line in lines.items() if line == text)


def viewing(display: str) -> tuple[int, int, int]:
    scrollbar = re.search(r"^\*\*viewing lines \[(\d+) - (\d+)\] of (\d+)\*\*$", display, re.MULTILINE)
    return int(scrollbar[1]), int(scrollbar[2]), int(scrollbar[3])


def call(tool: Browser, function: str, **arguments) -> str:
    return tool.call(function, json.dumps(arguments))


def test_search_ranks_the_page_with_the_query_words_first(tool, site):
    display = call(tool, "search", query="ladybugs aphids")
    assert display.startswith("[0] ladybugs aphids\n**viewing lines [0 - 3] of 3**\n\n")
    lines = numbered(display)
    assert lines[0] == "# Search Results"
    assert lines[2].startswith("  * 【0†Garden pests】 Aphids suck sap")
    assert lines[3].startswith("  * 【1†Garden pests】")  # the copy in sub/
    assert "ignored.json" not in display
    pests = {url_of(site / "pests.html"), url_of(site / "sub" / "pests.html")}
    assert tool.last_action["type"] == "search" and tool.last_action["query"] == "ladybugs aphids"
    assert {s["url"] for s in tool.last_action["sources"]} == pests
    assert all(s["type"] == "url" for s in tool.last_action["sources"])

    assert "【0†Watering notes】" in call(tool, "search", query="rain barrels")
    assert call(tool, "search", query="rain barrels", topn=1).count("  * ") == 1
    assert "No results" in call(tool, "search", query="xylophone")


def test_open_a_search_result_by_link_id(tool, site):
    call(tool, "search", query="ladybugs aphids")
    display = call(tool, "open", id=0)
    url = url_of(site / "pests.html")
    lines = numbered(display)
    last = max(lines)
    assert display.startswith(f"[1] Garden pests ({url})\n**viewing lines [0 - {last}] of {last}**\n\nL0: \n")
    heading = line_of(lines, "## Aphids")
    assert "".join(lines[n] for n in range(1, heading)) == f"URL: {url}"  # wrapped at 80 columns when long
    assert [lines[n] for n in range(heading, last + 1)] == [
        "## Aphids", "", "Aphids suck sap from tomato leaves.", "",
        "Ladybugs eat aphids, so invite ladybugs into the garden.", "", "Go back to the 【0†garden guide】."]
    assert "script" not in display
    assert tool.last_action == {"type": "open_page", "url": url}


def test_open_by_url_by_relative_path_and_by_a_link_in_the_page(tool, site):
    guide = call(tool, "open", id=url_of(site / "index.html"))
    lines = numbered(guide)
    assert guide.startswith("[0] Garden guide (")
    assert lines[line_of(lines, "# Growing tomatoes") + 2].startswith("Tomatoes need full sun")
    assert "Tomatoes need full sun and deep watering. Read about 【0†garden pests】 or buy" in "".join(lines.values())
    assert "【1†a seed shop†seeds.example.org】" in guide  # another site is named in the link
    assert "Back to top" in guide and "【2†Back" not in guide  # an anchor on the same page is just text
    assert "  * Stake the plants early." in lines.values() and "  * Pinch the side shoots." in lines.values()
    assert "Fish & chips, and a fake link 〖9†fake〗." in lines.values()  # page text cannot fake a link
    assert all(len(line) <= 80 for line in lines.values())

    notes = call(tool, "open", id="notes.md")
    assert notes.startswith("[1] Watering notes (")
    assert "See 【0†the guide】 and [Image 0: a can]." in notes

    followed = call(tool, "open", id=0, cursor=0)  # link 0 of the guide at cursor 0: the pests page
    assert followed.startswith(f"[2] Garden pests ({url_of(site / 'pests.html')})")
    assert tool.last_action == {"type": "open_page", "url": url_of(site / "pests.html")}
    back = call(tool, "open", id=0)  # from the subfolder's copy the relative link resolves there too
    assert back.startswith("[3] Garden guide")
    assert "Go back" in call(tool, "open", id="sub/pests.html")
    assert call(tool, "open", id=0).startswith(f"[5] Garden guide ({url_of(site / 'index.html')})")


def test_loc_and_num_lines_scroll_the_page(tool, site):
    whole = numbered(call(tool, "open", id="index.html"))
    part = call(tool, "open", loc=4, num_lines=3)  # the page at the current cursor
    assert part.startswith(f"[1] Garden guide ({url_of(site / 'index.html')})\n")
    assert viewing(part) == (4, 6, len(whole) - 1)
    assert numbered(part) == {n: whole[n] for n in (4, 5, 6)}
    tail = call(tool, "open", cursor=0, loc=len(whole) - 2)
    assert viewing(tail) == (len(whole) - 2, len(whole) - 1, len(whole) - 1)
    assert "Cannot exceed page maximum" in call(tool, "open", cursor=0, loc=len(whole))


def test_a_long_page_is_shown_about_1024_tokens_at_a_time(site):
    (site / "long.txt").write_text("\n".join(f"Line {n} of a long plain text file about gardens." for n in range(400)))
    tool = Browser(LocalBackend(site))
    first = call(tool, "open", id="long.txt")
    start, end, total = viewing(first)
    offset = line_of(numbered(first), "Line 0 of a long plain text file about gardens.")
    assert (start, total) == (0, offset + 399) and end < total
    tokens = len(get_tokenizer().encode(first.split("\n\n", 1)[1]))
    assert 1024 - 20 <= tokens <= 1024 + 20
    second = call(tool, "open", loc=end + 1)
    assert viewing(second)[0] == end + 1
    assert numbered(second)[end + 1] == f"Line {end + 1 - offset} of a long plain text file about gardens."


def test_find_shows_matches_with_the_page_line_numbers(tool, site):
    page = numbered(call(tool, "open", id="pests.html"))
    found = call(tool, "find", pattern="LADYBUGS")
    url = url_of(site / "pests.html")
    assert found.startswith(f"[1] Find results for text: `LADYBUGS` in `Garden pests` ({url}/find?pattern=LADYBUGS)")
    match_line = next(n for n, line in page.items() if "Ladybugs" in line)
    assert numbered(found)[0] == f"# 【0†match at L{match_line}】"
    assert numbered(found)[1] == page[match_line]
    assert tool.last_action == {"type": "find_in_page", "pattern": "LADYBUGS", "url": url}

    matches = call(tool, "find", pattern="garden guide", cursor=0)  # the text of a link is found too
    assert "Go back to the garden guide." in matches

    opened = call(tool, "open", id=0, cursor=1)  # a find result opens its page near the match
    assert opened.startswith(f"[3] Garden pests ({url})")
    assert match_line in numbered(opened)

    assert call(tool, "find", pattern="zucchini", cursor=0).endswith("L0: No `find` results for pattern: `zucchini`")
    assert "Cannot run `find`" in call(tool, "find", pattern="x", cursor=1)


def test_cited_lines_and_normalized_citations(tool, site):
    results = numbered(call(tool, "search", query="tomatoes"))
    lines = numbered(call(tool, "open", id="pests.html"))
    assert tool.cited_lines(1, 4) == lines[4]
    assert tool.cited_lines(1, 4, 6) == "\n".join(lines[n] for n in (4, 5, 6))
    last = max(lines)
    assert tool.cited_lines(1, last - 1, last + 50) == "\n".join(lines[n] for n in (last - 1, last))
    with pytest.raises(LookupError):
        tool.cited_lines(5, 0)

    url = url_of(site / "pests.html")
    text, annotations = tool.normalize_citations(f"Ladybugs eat aphids【1†L{last - 2}-L{last}】. Unknown【7†L1】.")
    assert text == f"Ladybugs eat aphids ([pests.html]({url})). Unknown【7†L1】."
    [annotation] = annotations
    assert annotation == {"type": "url_citation", "start_index": 20, "end_index": 20 + len(f"([pests.html]({url}))"),
                          "url": url, "title": "Garden pests"}
    assert text[annotation["start_index"]:annotation["end_index"]] == f"([pests.html]({url}))"

    search_line = next(n for n, line in results.items() if "Garden guide" in line)  # cited: a search result
    text, annotations = tool.normalize_citations(f"Tomatoes 【0†L{search_line}】 and more 【1†L4】")
    assert [a["url"] for a in annotations] == [url_of(site / "index.html"), url]
    assert [a["title"] for a in annotations] == ["Garden guide", "Garden pests"]
    for a in annotations:
        assert text[a["start_index"]:a["end_index"]] == f"([{a['url'].rsplit('/', 1)[1]}]({a['url']}))"
    assert text.startswith("Tomatoes ([index.html](")  # no double space before the marker


@pytest.mark.parametrize("function, arguments, error", [
    ("open", "{not json", "Invalid function arguments"),
    ("open", "[1, 2]", "expected a JSON object"),
    ("search", '{"query": 3}', "`query` must be a non-empty string"),
    ("search", '{"topn": 5}', "`query` must be a non-empty string"),
    ("search", '{"query": "aphids", "topn": "many"}', "`topn` must be an integer"),
    ("open", '{"id": 99}', "Invalid link id `99`"),
    ("open", '{"id": true}', "`id` must be an integer"),
    ("open", '{"id": "https://nowhere.example/x"}', "Error fetching URL `https://nowhere.example/x`"),
    ("open", '{"id": "../outside.html"}', "Error fetching URL"),
    ("open", '{"id": "a\\u0000b.html"}', "Error fetching URL"),
    ("open", '{"cursor": 7}', "Cursor `7` is out of range. Available cursor indices: [0 - 0]"),
    ("open", '{"cursor": 0, "loc": [1]}', "`loc` must be an integer"),
    ("open", '{"cursor": 0, "view_source": "yes"}', "`view_source` must be true or false"),
    ("find", '{"pattern": ""}', "`pattern` must be a non-empty string"),
    ("find", '{"pattern": "x", "cursor": -5}', "Cursor `-5` is out of range"),
    ("click", "{}", "Unknown function `click`"),
])
def test_bad_calls_answer_with_an_error_and_the_browser_goes_on(tool, site, function, arguments, error):
    (site.parent / "outside.html").write_text("<p>secret</p>")
    call(tool, "search", query="aphids")
    answer = tool.call(function, arguments)
    assert error in answer and not answer.startswith("[")
    assert tool.last_action is None
    assert call(tool, "open", id=0).startswith("[1] Garden pests")  # the failed call took no cursor


def test_no_pages_yet_and_lenient_arguments(tool):
    assert "No pages to access" in tool.call("open", "")
    assert "No pages to access" in call(tool, "find", pattern="x")
    display = tool.call("browser.search", '{"query": "aphids", "topn": 2.0, "source": null, "extra": 1}')
    assert display.startswith("[0] aphids")
    assert call(tool, "open", id="0", cursor="0").startswith("[1] Garden pests")  # numbers written as strings


def test_a_failing_backend_is_an_answer_not_an_exception():
    class Broken:
        name, external = "broken", True

        def search(self, query, topn):
            raise ConnectionError("network unreachable")

        def fetch(self, url):
            raise ValueError()

    tool = Browser(Broken())
    assert call(tool, "search", query="x") == "Error during search for `x`: network unreachable"
    assert call(tool, "open", id="https://a.example/") == "Error fetching URL `https://a.example/`: ValueError"


def test_view_source_shows_the_raw_file(tool):
    call(tool, "open", id="pests.html")
    source = call(tool, "open", cursor=0, view_source=True)
    assert source.startswith("[1] Garden pests (view-source:file://")
    assert "<script>var aphids" in source
    assert tool.last_action["url"].startswith("file://")


def test_html_conversion():
    page = document_page(GUIDE, "https://garden.example/guide/index.html")
    assert page.title == "Garden guide"
    assert page.links == {0: "https://garden.example/guide/pests.html", 1: "https://seeds.example.org/tomato"}
    assert "color: green" not in page.text
    assert "\n# Growing tomatoes\n\nTomatoes need full sun and deep watering. Read about 【0†garden pests】" in page.text
    assert document_page("<p>no title</p>", "https://x.example/", fallback_title="x.example").title == "x.example"
    assert document_page("## Sub\n# Main\n", "file:///n.md", "markdown").title == "Main"
    assert document_page("[a](b.md) [a](./b.md)", "file:///d/n.md", "markdown").links == {0: "file:///d/b.md"}


def test_backend_from_spec(site, tmp_path, monkeypatch):
    backend = backend_from_spec(f"local:{site}")
    assert isinstance(backend, LocalBackend) and backend.name == "local" and backend.external is False
    with pytest.raises(BrowserError, match="does not exist"):
        backend_from_spec(f"local:{tmp_path / 'missing'}")
    for spec in ("bing", "local:", "", "exa:key"):
        with pytest.raises(BrowserError, match="unknown browser backend"):
            backend_from_spec(spec)
    monkeypatch.delenv("EXA_API_KEY", raising=False)
    monkeypatch.delenv("YDC_API_KEY", raising=False)
    with pytest.raises(BrowserError, match="EXA_API_KEY"):
        backend_from_spec("exa")
    with pytest.raises(BrowserError, match="YDC_API_KEY"):
        backend_from_spec("youcom")
    monkeypatch.setenv("EXA_API_KEY", "k")
    assert isinstance(backend_from_spec("exa"), ExaBackend) and backend_from_spec("exa").external


class FakeHttp:
    """Stands in for browser._http_json: records each request and answers with the canned JSON for its path."""

    def __init__(self, answers: dict[str, object]):
        self.answers, self.requests = answers, []

    def __call__(self, url, headers, payload=None, timeout=30.0):
        self.requests.append((url, headers, payload))
        return next(answer for path, answer in self.answers.items() if path in url)


def test_exa_backend(monkeypatch):
    monkeypatch.setenv("EXA_API_KEY", "exa-key")
    http = FakeHttp({
        "/search": {"results": [
            {"title": "Result 1", "url": "https://www.example.com/1", "summary": "Result 1 summary"},
            {"title": "Result 2", "url": "https://www.example.com/2", "summary": "Result 2 summary"}]},
        "/contents": {"results": [{"title": "Fetch Result 1", "url": "https://www.example.com/1",
                                   "text": "<div>Fetch Result 1 text <a href='/2'>next</a></div>"}]},
    })
    monkeypatch.setattr(browser, "_http_json", http)
    backend = ExaBackend()
    assert backend.search("test", 10) == [SearchResult("https://www.example.com/1", "Result 1", "Result 1 summary"),
                                          SearchResult("https://www.example.com/2", "Result 2", "Result 2 summary")]
    url, headers, payload = http.requests[0]
    assert url == "https://api.exa.ai/search" and headers["x-api-key"] == "exa-key"
    assert payload == {"query": "test", "numResults": 10, "contents": {"text": True, "summary": True}}

    tool = Browser(backend)
    results = call(tool, "search", query="test")
    assert numbered(results)[2] == "  * 【0†Result 1†www.example.com】 Result 1 summary"
    page = call(tool, "open", id=0)
    assert page.startswith("[1] Fetch Result 1 (https://www.example.com/1)")
    assert numbered(page)[2] == "Fetch Result 1 text 【0†next】"
    assert http.requests[-1][0] == "https://api.exa.ai/contents"
    assert http.requests[-1][2] == {"urls": ["https://www.example.com/1"], "text": {"includeHtmlTags": True}}
    assert tool.normalize_citations("x【1†L2】")[0] == "x ([www.example.com](https://www.example.com/1))"

    http.answers["/contents"] = {"results": []}
    assert "Exa returned no contents" in call(tool, "open", id="https://www.example.com/gone")


def test_youcom_backend(monkeypatch):
    monkeypatch.setenv("YDC_API_KEY", "ydc-key")
    http = FakeHttp({
        "/v1/search": {"results": {
            "web": [{"title": "Web Result 1", "url": "https://www.example.com/web1",
                     "snippets": ["Web Result 1 snippets", "more"]}],
            "news": [{"title": "News Result 1", "url": "https://www.example.com/news1",
                      "description": "News Result 1 description"}]}},
        "/v1/contents": [{"title": "Fetch Result 1", "url": "https://www.example.com/fetch1",
                          "html": "<div>Fetch Result 1 text</div>"}],
    })
    monkeypatch.setattr(browser, "_http_json", http)
    backend = YouComBackend()
    assert backend.search("tomato plants", 5) == [
        SearchResult("https://www.example.com/web1", "Web Result 1", "Web Result 1 snippets more"),
        SearchResult("https://www.example.com/news1", "News Result 1", "News Result 1 description")]
    url, headers, payload = http.requests[0]
    assert url == "https://api.ydc-index.io/v1/search?query=tomato+plants&count=5" and payload is None
    assert headers["x-api-key"] == "ydc-key"

    page = backend.fetch("https://www.example.com/fetch1")
    assert page == Page("https://www.example.com/fetch1", "Fetch Result 1",
                        "\nURL: https://www.example.com/fetch1\nFetch Result 1 text", {})
    assert http.requests[-1][2] == {"urls": ["https://www.example.com/fetch1"], "livecrawl_formats": "html"}


def test_http_errors_name_the_service(monkeypatch):
    def refuse(request, timeout):
        raise browser.urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)

    monkeypatch.setattr(browser.urllib.request, "urlopen", refuse)
    with pytest.raises(BrowserError, match="api.exa.ai answered HTTP 401"):
        browser._http_json("https://api.exa.ai/search", {}, {"query": "x"})
