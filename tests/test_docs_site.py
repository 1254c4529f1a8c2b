"""Visits every page of the built documentation site in headless Chromium.

Build the site first (``sphinx-build -W --keep-going -b html docs
docs/_build/html``). The site is served by ``http.server`` on 127.0.0.1 and
Debian's ``chromium`` is driven through the DevTools protocol over a pipe
(``--remote-debugging-pipe``: no port, no network). Starting at the home page,
every internal page that a link reaches is loaded in the browser, and:

- every internal link points to a file that exists, and its ``#anchor`` to an
  element of that page;
- every image on every page loads (decodes, non-zero width) and is a
  non-empty PNG or SVG file;
- the API page has an entry for every name in ``gradient_ascent_jax.__all__``,
  and shows the type aliases (``optax.ScalarOrSchedule``), not their expansions;
- the site search for ``maximize`` lists the API entry of ``maximize``;
- every row of every markdown table in docs/ and in the notebooks is on its
  page, with as many cells as its source row has (a row joined to the one
  before by ``||`` is silently dropped by the renderer);
- at 1024, 1280 and 1440 px no element of any page reaches past the content
  column or hides part of itself behind a scroll bar, code blocks included
  (their long lines wrap);
- at 1280 px a literal in a table (a test path, a long name) wraps only at a
  space or after a separator (``/ . _ : , (``), never inside a word.

Without the built site or chromium the test skips, unless ``CI`` is set: then
it fails, so CI cannot pass without running it.
"""

from __future__ import annotations

import fcntl
import functools
import http.server
import json
import os
from pathlib import Path
import queue
import re
import shutil
import subprocess
import threading
import time
from urllib.parse import unquote
from urllib.parse import urldefrag
from urllib.parse import urlparse

import pytest

import gradient_ascent_jax as gax
from tests import _optional

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SITE = DOCS / "_build" / "html"
PAGE_TIMEOUT_S = 30
CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
  "--remote-debugging-pipe",
]

# Run in the page after its load event: what the checks need, as JSON.
PAGE_FACTS = """(async () => {
  const images = [...document.images];
  for (const image of images) image.loading = "eager";
  const loaded = await Promise.all(images.map(
      image => image.decode().then(() => image.naturalWidth > 0, () => false)));
  return {
    ids: [...document.querySelectorAll("[id]")].map(e => e.id)
        .concat([...document.querySelectorAll("a[name]")].map(e => e.name)),
    links: [...document.querySelectorAll("a[href]")].map(a => a.href),
    images: images.map((image, i) => ({src: image.currentSrc || image.src, loaded: loaded[i]})),
  };
})()"""
# For each API entry (a <dt id=...> of the Python domain): does it show an example?
API_EXAMPLES = """Object.fromEntries([...document.querySelectorAll("dl.py > dt[id]")].map(
    dt => [dt.id, dt.parentElement.querySelector(":scope > dd").innerText.includes(">>>")]))"""
SEARCH_HITS = "[...document.querySelectorAll('#search-results li a')].map(a => a.href)"
# The number of cells of each row of each table of the article, in order.
TABLE_ROWS = """[...document.querySelectorAll("article.bd-article table")].map(
    table => [...table.rows].map(row => row.cells.length))"""
# Elements of the article that reach past its sides, or that hide part of their
# content behind a scroll bar (a code block with a line too long to show).
OVERFLOWING = """(() => {
  const column = document.querySelector("article.bd-article").getBoundingClientRect();
  const described = e => e.tagName.toLowerCase() + (e.className ? "." + e.className : "")
      + ": " + (e.innerText || e.getAttribute("src") || "").slice(0, 60).replace(/\\s+/g, " ");
  const found = [], reported = [];  // only the outermost element of each overflow
  for (const e of document.querySelectorAll("article.bd-article *")) {
    if (reported.some(r => r.contains(e))) continue;
    const box = e.getBoundingClientRect();
    if (box.width === 0 && box.height === 0) continue;
    if (box.right > column.right + 1 || box.left < column.left - 1) {
      found.push(`${described(e)} spans x = ${Math.round(box.left)}..${Math.round(box.right)}`
          + `, the column ${Math.round(column.left)}..${Math.round(column.right)}`);
      reported.push(e);
    } else if (e.scrollWidth > e.clientWidth + 1 && getComputedStyle(e).overflowX !== "visible") {
      found.push(`${described(e)} hides ${e.scrollWidth - e.clientWidth} px behind a scroll bar`);
      reported.push(e);
    }
  }
  return found;
})()"""
WIDTHS = (1024, 1280, 1440)
# Where a literal in a table wraps inside a word: a new line that starts within
# one text node, after a character that is not a space. The site puts each word
# of a literal, and each piece between separators, in a text node of its own.
MID_WORD_BREAKS = """(() => {
  const found = [];
  for (const code of document.querySelectorAll("article.bd-article table code")) {
    const walker = document.createTreeWalker(code, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      const range = document.createRange();
      let top = null;
      for (let i = 0; i < node.length; i++) {
        range.setStart(node, i);
        range.setEnd(node, i + 1);
        const rects = range.getClientRects();
        if (!rects.length) continue;
        if (top !== null && rects[0].top > top + 2 && !/\\s/.test(node.data[i - 1])) {
          found.push(`${code.innerText.slice(0, 80)}: breaks before ${node.data.slice(i, i + 12)}`);
          break;
        }
        top = rects[0].top;
      }
    }
  }
  return found;
})()"""


def chromium_path() -> str | None:
  return shutil.which("chromium") or (
    "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
  )


def missing_prerequisite() -> str | None:
  if not (SITE / "index.html").exists():
    return (
      f"no built site at {SITE}: run sphinx-build -W --keep-going -b html docs docs/_build/html"
    )
  if chromium_path() is None:
    return "no chromium: apt-get install -y chromium"
  return None


@pytest.fixture(scope="module")
def site_url():
  reason = missing_prerequisite()
  if reason:
    _optional.missing(f"the browser check cannot run: {reason}")

  class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
      pass

  server = http.server.ThreadingHTTPServer(
    ("127.0.0.1", 0), functools.partial(Quiet, directory=str(SITE))
  )
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f"http://127.0.0.1:{server.server_address[1]}/"
  finally:
    server.shutdown()
    server.server_close()


class Browser:
  """A headless Chromium, one tab, spoken to over --remote-debugging-pipe."""

  def __init__(self, profile: Path):
    to_browser_r, self._to_browser = os.pipe()
    self._from_browser, from_browser_w = os.pipe()

    # The protocol: Chromium reads fd 3 and writes fd 4. bash puts the pipe
    # ends there and execs Chromium, so no Python runs between fork and exec
    # (a preexec_fn would, in a process whose JAX threads may hold locks).
    # Both ends are moved to fds >= 10 first, so that neither move overwrites
    # the other.
    read_end, write_end = (
      fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_browser_r, from_browser_w)
    )
    os.close(to_browser_r)
    os.close(from_browser_w)
    self.process = subprocess.Popen(
      [
        "bash",
        "-c",
        f'exec "$0" "$@" 3<&{read_end} 4>&{write_end} {read_end}<&- {write_end}>&-',
        chromium_path(),
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "about:blank",
      ],
      pass_fds=(read_end, write_end),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    os.close(read_end)  # the browser holds its own copies now
    os.close(write_end)
    self._next_id = 0
    self._messages: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    target = self.call("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
    self.call("Page.enable", session=True)

  def _read(self):
    buffer = b""
    while chunk := os.read(self._from_browser, 1 << 16):
      buffer += chunk
      *messages, buffer = buffer.split(b"\0")
      for message in messages:
        self._messages.put(json.loads(message))

  def _wait(self, matches, timeout_s=PAGE_TIMEOUT_S):
    deadline = time.monotonic() + timeout_s
    while True:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        raise TimeoutError("Chromium did not answer in time")
      try:
        message = self._messages.get(timeout=remaining)
      except queue.Empty as error:
        raise TimeoutError("Chromium did not answer in time") from error
      if matches(message):
        return message

  def call(self, method, session=False, **params):
    self._next_id += 1
    message = {"id": self._next_id, "method": method, "params": params}
    if session:
      message["sessionId"] = self.session
    os.write(self._to_browser, json.dumps(message).encode() + b"\0")
    answer = self._wait(lambda m, i=self._next_id: m.get("id") == i)
    assert "error" not in answer, f"{method}: {answer['error']}"
    return answer["result"]

  def load(self, url):
    """Navigates and returns when the page's load event has fired."""
    result = self.call("Page.navigate", session=True, url=url)
    assert "errorText" not in result, f"{url}: {result['errorText']}"
    self._wait(lambda m: m.get("method") == "Page.loadEventFired")

  def evaluate(self, expression):
    result = self.call(
      "Runtime.evaluate",
      session=True,
      expression=expression,
      returnByValue=True,
      awaitPromise=True,
    )
    assert "exceptionDetails" not in result, result["exceptionDetails"]
    return result["result"]["value"]

  def close(self):
    self.process.kill()
    self.process.wait(timeout=30)
    os.close(self._to_browser)


@pytest.fixture(scope="module")
def browser(site_url, tmp_path_factory):
  chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
  try:
    yield chromium
  finally:
    chromium.close()


def local_file(url: str, site_url: str) -> Path:
  return SITE / unquote(urlparse(url).path).lstrip("/")


@pytest.fixture(scope="module")
def crawl(browser, site_url):
  """Loads every internal page reachable from the home page: {url: facts}."""
  pages, todo = {}, [site_url + "index.html"]
  while todo:
    url = todo.pop()
    if url in pages:
      continue
    browser.load(url)
    facts = browser.evaluate(PAGE_FACTS)
    pages[url] = facts
    for link in facts["links"]:
      target, _ = urldefrag(link)
      if target.startswith(site_url) and target.endswith(".html") and target not in pages:
        if local_file(target, site_url).exists():
          todo.append(target)
  return pages


@pytest.mark.slow  # builds and visits the site in Chromium
def test_every_internal_link_and_anchor_resolves(crawl, site_url):
  broken = []
  for page, facts in crawl.items():
    for link in facts["links"]:
      target, anchor = urldefrag(link)
      if not target.startswith(site_url):
        continue  # external: not fetched, the check runs offline
      if target.endswith("/"):
        target += "index.html"
      if not local_file(target, site_url).is_file():
        broken.append(f"{page}: link to missing {link}")
      elif anchor and target in crawl and unquote(anchor) not in crawl[target]["ids"]:
        broken.append(f"{page}: link to missing anchor {link}")
  assert len(crawl) >= 15, sorted(crawl)
  assert not broken, "\n".join(broken)


@pytest.mark.slow  # builds and visits the site in Chromium
def test_every_image_loads_and_is_a_png_or_svg(crawl, site_url):
  problems, seen = [], 0
  for page, facts in crawl.items():
    for image in facts["images"]:
      seen += 1
      path = local_file(image["src"], site_url)
      head = path.read_bytes()[:512] if path.is_file() else b""
      if not image["loaded"]:
        problems.append(f"{page}: image did not load: {image['src']}")
      elif not (head.startswith(b"\x89PNG\r\n\x1a\n") or b"<svg" in head):
        problems.append(f"{page}: not a non-empty PNG or SVG: {image['src']}")
  assert seen >= 5  # the notebooks' plots and the benchmark plot
  assert not problems, "\n".join(problems)


@pytest.mark.slow  # builds and visits the site in Chromium
def test_api_page_lists_every_public_name_with_its_example(crawl, browser, site_url):
  ids = set(crawl[site_url + "api.html"]["ids"])
  missing = [name for name in gax.__all__ if f"gradient_ascent_jax.{name}" not in ids]
  assert not missing, f"no API entry for {missing}"
  browser.load(site_url + "api.html")
  has_example = browser.evaluate(API_EXAMPLES)
  without = [name for name in gax.__all__ if not has_example.get(f"gradient_ascent_jax.{name}")]
  assert not without, f"API entries without an example: {without}"


@pytest.mark.slow  # builds and visits the site in Chromium
def test_api_page_shows_type_aliases_not_their_expansions(browser, site_url):
  browser.load(site_url + "api.html")
  text = browser.evaluate("document.body.innerText")
  for shown in (
    "learning_rate (optax.ScalarOrSchedule)",
    "momentum (jax.typing.ArrayLike)",
    "accumulator_dtype (jax.typing.DTypeLike | None)",
    "count (chex.Array)",
  ):
    assert shown in text
  for expanded in ("ndarray", "numpy.", "Callable[", "TypeAliasForwardRef"):
    assert expanded not in text


@pytest.mark.slow  # builds and visits the site in Chromium
def test_notebooks_are_rendered(crawl, site_url):
  rendered = {Path(urlparse(url).path).stem for url in crawl if "/notebooks/" in url}
  expected = {path.stem for path in (ROOT / "notebooks").glob("*.ipynb")}
  assert expected and expected <= rendered, f"not on the site: {sorted(expected - rendered)}"


@pytest.mark.slow  # builds and visits the site in Chromium
def test_search_finds_maximize(browser, site_url):
  browser.load(site_url + "search.html?q=maximize")
  hits, deadline = [], time.monotonic() + PAGE_TIMEOUT_S
  while time.monotonic() < deadline:  # the search runs in the page after load
    hits = browser.evaluate(SEARCH_HITS)
    if any(hit.endswith("api.html#gradient_ascent_jax.maximize") for hit in hits):
      return
    time.sleep(0.25)
  pytest.fail(f"searching 'maximize' did not list the API entry; results: {hits}")


def markdown_tables(text: str) -> list[list[int]]:
  """The number of cells of each row (the separator line excepted) of each table.

  Cells are split at every unescaped ``|``, inside code spans too, as
  markdown-it (and GitHub) do; fenced code blocks are skipped.
  """
  tables, rows, fence = [], None, None
  for line in text.splitlines() + [""]:
    stripped = line.strip()
    marker = re.match(r"(`{3,}|~{3,})", stripped)
    if fence is None and marker:
      fence = marker.group(1)[0] * 3
    elif fence is not None:
      if stripped.startswith(fence):
        fence = None
      continue
    if stripped.startswith("|"):
      if rows is None:
        rows = []
      if not re.fullmatch(r"\|[\s:|-]+\|", stripped) or not rows:
        rows.append(len(re.split(r"(?<!\\)\|", stripped.strip("|"))))
    elif rows is not None:
      tables.append(rows)
      rows = None
  return tables


def markdown_sources() -> dict[str, str]:
  """{page path in the site: markdown text} for docs/**/*.md and the notebooks' markdown."""
  sources = {}
  for path in sorted(DOCS.rglob("*.md")):
    relative = path.relative_to(DOCS)
    if relative.parts[0] not in ("_build", "notebooks"):
      sources[str(relative.with_suffix(".html"))] = path.read_text(encoding="utf-8")
  for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    text = "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    sources[f"notebooks/{path.stem}.html"] = text
  return sources


def test_markdown_tables_parser_counts_cells_of_joined_rows():
  text = (
    "| a | b |\n| --- | --- |\n| `x` | y |\n| c | d || e | f |\n\n```\n| not | a | table |\n```\n"
  )
  assert markdown_tables(text) == [[2, 2, 5]]


MAX_TABLE_ROWS = 30  # a longer table is a wall: split it by topic


def test_no_markdown_table_is_longer_than_a_screenful():
  long = [
    f"{page}: table {number} has {len(rows) - 1} rows"
    for page, text in markdown_sources().items()
    for number, rows in enumerate(markdown_tables(text), 1)
    if len(rows) - 1 > MAX_TABLE_ROWS
  ]
  assert not long, "\n".join(long)


@pytest.mark.slow  # builds and visits the site in Chromium
def test_every_row_of_every_markdown_table_is_rendered(browser, site_url):
  problems, rows_seen = [], 0
  for page, text in markdown_sources().items():
    expected = markdown_tables(text)
    if not expected:
      continue
    browser.load(site_url + page)
    rendered = browser.evaluate(TABLE_ROWS)
    if len(rendered) != len(expected):
      problems.append(f"{page}: {len(expected)} tables in the source, {len(rendered)} on the page")
      continue
    for number, (source_rows, page_rows) in enumerate(zip(expected, rendered, strict=True), 1):
      rows_seen += len(source_rows)
      header = source_rows[0]
      for row, cells in enumerate(source_rows):
        if cells != header:
          problems.append(
            f"{page}: table {number}, row {row}: {cells} cells where the header has "
            f"{header}; the renderer drops the extra ones (two rows joined by '||'?)"
          )
      if len(page_rows) != len(source_rows):
        problems.append(
          f"{page}: table {number} has {len(source_rows)} rows in the source, "
          f"{len(page_rows)} on the page"
        )
  assert rows_seen >= 100, rows_seen  # the "what happens when" table alone has more
  assert not problems, "\n".join(problems)


@pytest.mark.slow  # builds and visits the site in Chromium
@pytest.mark.parametrize("width", WIDTHS)
def test_no_page_element_overflows_the_content_column(crawl, browser, width):
  browser.call(
    "Emulation.setDeviceMetricsOverride",
    session=True,
    width=width,
    height=900,
    deviceScaleFactor=1,
    mobile=False,
  )
  problems = []
  try:
    for page in sorted(crawl):
      browser.load(page)
      problems += [f"{page} at {width} px: {found}" for found in browser.evaluate(OVERFLOWING)]
  finally:
    browser.call("Emulation.clearDeviceMetricsOverride", session=True)
  assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} in all)"


@pytest.mark.slow  # builds and visits the site in Chromium
def test_literals_in_tables_wrap_only_between_words_or_after_separators(crawl, browser):
  browser.call(
    "Emulation.setDeviceMetricsOverride",
    session=True,
    width=1280,
    height=900,
    deviceScaleFactor=1,
    mobile=False,
  )
  problems, pages_with_tables = [], 0
  try:
    for page in sorted(crawl):
      browser.load(page)
      if browser.evaluate("document.querySelectorAll('article.bd-article table code').length"):
        pages_with_tables += 1
      problems += [f"{page}: {found}" for found in browser.evaluate(MID_WORD_BREAKS)]
  finally:
    browser.call("Emulation.clearDeviceMetricsOverride", session=True)
  assert pages_with_tables >= 5, pages_with_tables
  assert not problems, "\n".join(problems[:40]) + f"\n({len(problems)} in all)"
