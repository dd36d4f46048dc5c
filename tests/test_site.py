"""The course as a website: ``mkdocs build`` (``make docs``) and the pages in a real browser.

The site is built once into a temporary folder. The checks on its files need only MkDocs and the
docs extra (``pip install -e .[docs]``); the browser checks also need Debian's ``chromium`` and
``chromium-driver`` and ``selenium``, and skip, saying which is missing, without them (``make
docs`` and CI install them). The browser talks only to a local ``http.server`` on 127.0.0.1,
and every other host name is made unresolvable for it, so a page that needs the network fails.

Screenshots of the home page and of lesson 7 are saved to ``build/screenshots/`` to look at.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import pytest

REPO = Path(__file__).resolve().parents[1]
LESSONS = sorted((REPO / "lessons").glob("[0-9][0-9]_*.ipynb"))
DOCS = sorted(p for p in (REPO / "docs").glob("*.md") if p.name != "index.md")
API_PACKAGES = ("engine", "nn", "ops", "model")
SCREENSHOTS = REPO / "build" / "screenshots"
SCREENSHOT_PAGES = {
    "index.html": "home.png",
    "lessons/07_roipool_vs_roialign.html": "lesson_07.png",
}
BUILD_TIMEOUT_S = 600
DOCS_EXTRA = "is not installed (pip install -e .[docs])"

# Tags whose URL the browser loads by itself: none may point at another host.
LOADED = {
    "script": "src",
    "link": "href",
    "img": "src",
    "iframe": "src",
    "source": "src",
    "embed": "src",
    "object": "data",
    "video": "src",
    "audio": "src",
}


def _lesson_page(path: Path) -> str:
    return f"lessons/{path.stem}.html"


# --- the build -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    for module in ("mkdocs", "material", "mkdocs_jupyter", "mkdocstrings", "latex2mathml"):
        pytest.importorskip(module, reason=f"{module} {DOCS_EXTRA}")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--site-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build failed:\n{result.stderr[-4000:]}"
    return out


class _Tags(HTMLParser):
    """Every start tag of a page as (tag, attributes), and every element id."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.ids: set[str] = set()

    def handle_starttag(self, tag, attrs):
        attributes = {k: v or "" for k, v in attrs}
        self.tags.append((tag, attributes))
        if "id" in attributes:
            self.ids.add(attributes["id"])


@functools.cache
def _parse(path: Path) -> _Tags:
    parser = _Tags()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


LOCAL_SCHEMES = ("data:", "blob:", "about:", "mailto:", "javascript:")


def _is_external(url: str) -> bool:
    """A URL that names a host: protocol-relative, or with a scheme that is not local."""
    if url.startswith("//"):
        return True
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", url)) and not url.startswith(LOCAL_SCHEMES)


def _broken_link(site: Path, page: str, href: str) -> str | None:
    """Why a relative href on site page ``page`` does not resolve, or None when it does."""
    parts = urlsplit(href)
    path = unquote(parts.path)
    if path.startswith("/"):  # from the site's root (the 404 page's links)
        target = site / path.lstrip("/")
    else:
        target = (site / page).parent / path if path else site / page
    target = target.resolve()
    if not target.is_relative_to(site.resolve()):
        return f"{href} leaves the site"
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{href}: no file {target.relative_to(site.resolve())}"
    if parts.fragment and target.suffix == ".html":
        if unquote(parts.fragment) not in _parse(target).ids:
            return f"{href}: no id '{unquote(parts.fragment)}' in {target.name}"
    return None


# --- checks on the built files ---------------------------------------------------------------


def test_nav_lists_every_lesson_every_doc_and_the_api(site: Path):
    nav = {a.get("href") for tag, a in _parse(site / "index.html").tags if tag == "a"}
    wanted = [_lesson_page(p) for p in LESSONS] + [f"{p.stem}.html" for p in DOCS]
    wanted += [f"api/{name}.html" for name in API_PACKAGES]
    missing = [page for page in wanted if page not in nav]
    assert not missing, f"pages missing from the home page's navigation: {missing}"
    for page in wanted:
        assert (site / page).is_file(), f"{page} was not built"


def test_no_page_loads_anything_from_another_host(site: Path):
    found = []
    for page in sorted(site.rglob("*.html")):
        for tag, attributes in _parse(page).tags:
            url = attributes.get(LOADED.get(tag, ""), "")
            if url and _is_external(url):
                found.append(f"{page.relative_to(site)}: <{tag}> {url}")
    for sheet in sorted(site.rglob("*.css")):
        for url in re.findall(r"url\(\s*['\"]?((?:https?:)?//[^'\")]+)", sheet.read_text("utf-8")):
            found.append(f"{sheet.relative_to(site)}: url({url})")
    assert not found, "the site fetches from other hosts:\n" + "\n".join(found[:20])


def test_every_relative_link_and_picture_resolves(site: Path):
    broken = []
    for page in sorted(site.rglob("*.html")):
        name = page.relative_to(site).as_posix()
        for tag, attributes in _parse(page).tags:
            url = attributes.get("href") if tag == "a" else attributes.get("src", "")
            if tag not in ("a", "img") or not url or _is_external(url):
                continue
            if url.startswith(("data:", "mailto:", "javascript:")):
                continue
            why = _broken_link(site, name, url)
            if why:
                broken.append(f"{name}: {why}")
    assert not broken, f"{len(broken)} broken links:\n" + "\n".join(broken[:30])


@pytest.mark.parametrize("path", LESSONS, ids=lambda p: p.stem)
def test_lesson_page_says_how_to_run_it_and_links_its_notebook(site: Path, path: Path):
    page = site / _lesson_page(path)
    text = page.read_text(encoding="utf-8")
    assert "Run it yourself" in text, f"{page.name} has no 'Run it yourself' note"
    links = {a.get("href") for tag, a in _parse(page).tags if tag == "a"}
    assert path.name in links, f"{page.name} does not link its notebook {path.name}"
    assert (page.parent / path.name).read_bytes() == path.read_bytes()
    assert "mathjax" not in text.lower(), f"{page.name} still loads MathJax"
    source = json.loads(path.read_text(encoding="utf-8"))
    markdown = "".join(
        "".join(c["source"]) for c in source["cells"] if c["cell_type"] == "markdown"
    )
    if re.search(r"\$[^$\s][^$\n]*\$", markdown):
        assert "<math" in text, f"{page.name}: the lesson's $...$ math was not made MathML"
    cells = re.findall(r'data-mime-type="text/markdown">(.*?)</div>', text, re.DOTALL)
    prose = [re.sub(r"<(pre|code|math)\b.*?</\1>", "", c, flags=re.DOTALL) for c in cells]
    raw_tex = [m for c in prose for m in re.findall(r"\$[^$<]*?\\[a-zA-Z]+[^$<]*\$?", c)]
    assert not raw_tex, f"{page.name}: TeX left unrendered: {raw_tex[:5]}"


def test_home_page_has_the_commands_the_pipeline_and_the_lessons(site: Path):
    page = site / "index.html"
    text = page.read_text(encoding="utf-8")
    for command in ("make demo", "make test"):
        assert command in text, f"the home page does not show `{command}`"
    tags = _parse(page).tags
    images = [a.get("src", "") for tag, a in tags if tag == "img"]
    assert any("pipeline" in src for src in images), f"no pipeline picture among {images}"
    links = {a.get("href", "") for tag, a in tags if tag == "a"}
    for lesson in LESSONS:
        assert _lesson_page(lesson) in links, f"the home page does not link {lesson.name}"
    for module in ("ops.html#minimask.ops.roi_align", "model.html#minimask.model.rpn"):
        assert f"api/{module}" in links, f"the stage table does not link {module}"


def test_api_reference_renders_the_docstrings(site: Path):
    for package in API_PACKAGES:
        page = site / "api" / f"{package}.html"
        ids = _parse(page).ids
        modules = sorted(
            p.stem for p in (REPO / "minimask" / package).glob("*.py") if p.stem != "__init__"
        )
        missing = [m for m in modules if f"minimask.{package}.{m}" not in ids]
        assert not missing, f"api/{package}.html has no section for {missing}"
    text = (site / "api" / "ops.html").read_text(encoding="utf-8")
    assert "bilinear" in text, "roi_align's docstring is not on the ops page"


def test_docs_pictures_are_generated_by_lessons_or_benchmarks():
    """Every file in docs/images/ is written by a lesson or by benchmark code, and every picture
    a doc shows is there: none is drawn by hand."""
    writers = {}
    for path in LESSONS:
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        writers[path.name] = "".join(
            "".join(c["source"]) for c in cells if c["cell_type"] == "code"
        )
    for path in sorted((REPO / "minimask" / "bench").rglob("*.py")):
        writers[str(path.relative_to(REPO))] = path.read_text(encoding="utf-8")
    images = sorted((REPO / "docs" / "images").iterdir())
    assert images, "docs/images/ is empty"
    orphans = [p.name for p in images if not any(p.name in code for code in writers.values())]
    assert not orphans, f"docs/images/ files that no lesson or benchmark writes: {orphans}"
    shown = set()
    for doc in [*DOCS, REPO / "docs" / "index.md"]:
        text = doc.read_text(encoding="utf-8")
        shown |= set(re.findall(r"(?:src=\"|\]\()(images/[^\")\s]+)", text))
    missing = [s for s in sorted(shown) if not (REPO / "docs" / s).is_file()]
    assert not missing, f"docs show pictures that docs/images/ lacks: {missing}"


# --- the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(site: Path):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a free port
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def _chromium() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip(
            "Chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
        )
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason=f"selenium {DOCS_EXTRA}")
    binary, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        # Offline: any host but the local server fails to resolve, and shows up as an error.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    service = webdriver.ChromeService(executable_path=driver_path)
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _open(driver, url: str) -> None:
    driver.get_log("browser")  # empty the logs: what follows belongs to this page
    driver.get_log("performance")
    driver.get(url)
    driver.execute_script("return document.readyState")


def _requests(driver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


_IMAGES_JS = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
images.forEach(i => { i.loading = "eager"; });
Promise.all(images.map(i => i.decode().catch(() => null))).then(() => done(
  images.map(i => [i.getAttribute("src").slice(0, 80), i.complete, i.naturalWidth])
));
"""


def _screenshot(driver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1280, min(int(height), 4000))
    driver.save_screenshot(str(SCREENSHOTS / name))
    driver.set_window_size(1280, 900)


PAGES = ["index.html"] + [_lesson_page(p) for p in LESSONS]


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_in_the_browser(browser, server: str, site: Path, page: str):
    url = urljoin(server, page)
    _open(browser, url)
    title = browser.title
    assert title and "404" not in title, f"{page}: title {title!r}"

    browser.set_script_timeout(60)
    images = browser.execute_async_script(_IMAGES_JS)
    assert images, f"{page} shows no picture"
    unloaded = [src for src, complete, width in images if not (complete and width > 0)]
    assert not unloaded, f"{page}: pictures that did not load: {unloaded}"

    hrefs = browser.execute_script(
        "return Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))"
    )
    broken = []
    for href in hrefs:
        if _is_external(href) or href.startswith(("data:", "mailto:", "javascript:")):
            continue
        why = _broken_link(site, page, href)
        if why:
            broken.append(why)
    assert not broken, f"{page}: broken links:\n" + "\n".join(broken[:20])

    elsewhere = [u for u in _requests(browser) if urlsplit(u).scheme in ("http", "https", "ws")]
    elsewhere = [u for u in elsewhere if urlsplit(u).hostname != "127.0.0.1"]
    assert not elsewhere, f"{page} asked other hosts for {elsewhere[:10]}"
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, f"{page}: console errors:\n" + "\n".join(errors[:10])

    if page in SCREENSHOT_PAGES:
        _screenshot(browser, SCREENSHOT_PAGES[page])


@pytest.mark.slow
def test_search_finds_roialign(browser, server: str, site: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _open(browser, urljoin(server, "index.html"))
    box = browser.find_element(By.CSS_SELECTOR, "input[data-md-component='search-query']")
    browser.execute_script("arguments[0].focus()", box)
    box.send_keys("RoIAlign")
    results = WebDriverWait(browser, 30).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".md-search-result__item")
    )
    texts = [r.text for r in results]
    assert any("roialign" in t.lower() for t in texts), f"results without RoIAlign: {texts[:5]}"
    links = [
        a.get_attribute("href")
        for a in browser.find_elements(By.CSS_SELECTOR, ".md-search-result__item a")
    ]
    pages = {urlsplit(link).path.lstrip("/") for link in links}
    assert "lessons/07_roipool_vs_roialign.html" in pages, f"lesson 7 not found: {sorted(pages)}"
    for path in pages:
        assert (site / unquote(path)).is_file(), f"a search result points at a missing {path}"
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, "console errors while searching:\n" + "\n".join(errors[:10])
