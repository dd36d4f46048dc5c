"""MkDocs hooks that turn ``docs/`` and ``lessons/`` into one site (see ``docs/site.md``).

Everything the site shows is picked up from the tree at build time, so that a new lesson or a new
page needs no edit here or in ``mkdocs.yml``:

- the **nav** is built from what exists: home, every ``lessons/NN_*.ipynb`` in order, the pages
  of ``docs/*.md`` (known ones in reading order, any others after them), the API reference;
- the **lessons** are added as pages straight from ``lessons/`` (mkdocs-jupyter renders their
  saved outputs without running them); each gets a "Run it yourself" note and a link to its
  ``.ipynb``, and its ``$...$`` math is turned into MathML here, so no MathJax is fetched;
- the **API reference** has one page per package (engine, nn, ops, model), one section per module
  found on disk, rendered by mkdocstrings from the docstrings;
- the **home page** (``docs/index.md``) pulls the README's opening and its "Two commands"
  section, the pipeline picture that lesson 0 draws (taken from its saved output), and the list
  of lessons;
- **links** written for reading the repository on disk (``../lessons/x.ipynb``,
  ``../minimask/ops/nms.py``, ``README.md``) are rewritten to the site's page for the same thing;
  a link to a file the site does not hold becomes plain text, so the site has no dead links.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import posixpath
import re
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File, Files
from mkdocs.utils import get_relative_url

log = logging.getLogger("mkdocs.hooks.minimask")

ROOT = Path(__file__).resolve().parents[2]  # the repository
LESSONS = ROOT / "lessons"
API_PACKAGES = ("engine", "nn", "ops", "model")  # minimask.<name>: one reference page each
# docs/*.md in reading order; pages not listed here follow them, sorted by name.
DOC_ORDER = ("lessons", "architecture", "coco", "weights", "benchmarks", "ablations", "site")
PIPELINE_IMAGE = "images/pipeline"  # + the extension of lesson 0's saved output

_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)(\))")  # markdown [text](target) and ![alt](src)
_HTML_URL = re.compile(r'(<(?:a|img)\b[^>]*?\b(?:href|src)=")([^"]*)(")', re.IGNORECASE)
_README_INCLUDE = re.compile(r"^<!-- README: (.+?) -->$", re.MULTILINE)


def _lesson_paths() -> list[Path]:
    return sorted(LESSONS.glob("[0-9][0-9]_*.ipynb"))


def _lesson_title(path: Path) -> str:
    """The notebook's first ``# heading``, or its file name."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] == "markdown":
            for line in "".join(cell["source"]).splitlines():
                if line.startswith("# "):
                    return line[2:].strip()
    return path.stem


def _doc_pages(docs_dir: Path) -> list[str]:
    known = [f"{name}.md" for name in DOC_ORDER if (docs_dir / f"{name}.md").is_file()]
    others = sorted(
        p.name for p in docs_dir.glob("*.md") if p.name != "index.md" and p.name not in known
    )
    return known + others


# --- nav -------------------------------------------------------------------------------------


def on_config(config):
    docs_dir = Path(config["docs_dir"])
    lessons = [f"lessons/{p.name}" for p in _lesson_paths()]
    docs = _doc_pages(docs_dir)
    if "lessons.md" in docs:  # the lesson list opens the lessons section
        docs.remove("lessons.md")
        lessons.insert(0, {"All lessons": "lessons.md"})
    config["nav"] = [
        {"Home": "index.md"},
        {"Lessons": lessons},
        {"Documentation": docs},
        {"API reference": [f"api/{name}.md" for name in API_PACKAGES]},
    ]
    return config


# --- files: lessons, API pages, the pipeline picture -----------------------------------------


def _api_page(package: str) -> str:
    folder = ROOT / "minimask" / package
    modules = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    lines = [
        f"# minimask.{package}",
        "",
        f"::: minimask.{package}",
        "    options:",
        "      show_root_heading: false",
        "      members: false",
        "",
        "Modules: " + ", ".join(f"[`{m}`](#minimask.{package}.{m})" for m in modules) + ".",
        "",
    ]
    for module in modules:
        lines += [f"::: minimask.{package}.{module}", ""]
    return "\n".join(lines)


def _pipeline_picture() -> tuple[str, bytes] | None:
    """Lesson 0's saved drawing of the pipeline: (extension, image bytes), or None."""
    overview = sorted(LESSONS.glob("00_*.ipynb"))
    if not overview:
        return None
    cells = json.loads(overview[0].read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] != "code" or "draw_pipeline(" not in "".join(cell["source"]):
            continue
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            for mime, ext in (("image/png", "png"), ("image/jpeg", "jpg")):
                if mime in data:
                    return ext, base64.b64decode("".join(data[mime]))
    return None


@event_priority(100)  # before mkdocs-jupyter's on_files, which claims the .ipynb files
def on_files(files: Files, config) -> Files:
    for path in _lesson_paths():
        files.append(
            File(
                f"lessons/{path.name}",
                src_dir=str(ROOT),
                dest_dir=config["site_dir"],
                use_directory_urls=config["use_directory_urls"],
            )
        )
    for package in API_PACKAGES:
        files.append(File.generated(config, f"api/{package}.md", content=_api_page(package)))
    picture = _pipeline_picture()
    if picture is None:
        log.warning("lesson 0 has no saved output of its draw_pipeline cell: no pipeline picture")
    else:
        ext, data = picture
        files.append(File.generated(config, f"{PIPELINE_IMAGE}.{ext}", content=data))
    return files


# --- links written for the repository, made into links of the site ---------------------------


def _site_target(repo_path: str) -> str | None:
    """The site's source path (src_uri, plus an #anchor) for a file of the repository, or None."""
    path, _, anchor = repo_path.partition("#")
    anchor = f"#{anchor}" if anchor else ""
    if path.startswith("docs/") and (ROOT / path).exists():
        return path[len("docs/") :] + anchor
    if path == "README.md":
        return "index.md"
    if re.fullmatch(r"lessons/[0-9][0-9]_[^/]+\.ipynb", path) and (ROOT / path).is_file():
        return path + anchor
    parts = path.rstrip("/").split("/")
    if len(parts) >= 2 and parts[0] == "minimask" and parts[1] in API_PACKAGES:
        page = f"api/{parts[1]}.md"
        if len(parts) == 2 or parts[2] == "__init__.py":
            return page
        module = parts[2].removesuffix(".py")
        if (ROOT / "minimask" / parts[1] / f"{module}.py").is_file():
            return f"{page}#minimask.{parts[1]}.{module}"
    return None


def _is_relative(url: str) -> bool:
    return not (url.startswith(("#", "/", "mailto:", "data:")) or re.match(r"^[a-z]+:", url))


def _rewrite(url: str, repo_dir: str, page_uri: str) -> str | None:
    """A relative link written in the repository file at ``repo_dir``, made relative to the
    site page ``page_uri`` (a src_uri). None where the site holds no such file."""
    path, _, anchor = url.partition("#")
    repo_path = posixpath.normpath(posixpath.join(repo_dir, path))
    target = _site_target(repo_path + (f"#{anchor}" if anchor else ""))
    if target is None:
        return None
    target_path, _, target_anchor = target.partition("#")
    relative = posixpath.relpath(target_path, posixpath.dirname(page_uri) or ".")
    return relative + (f"#{target_anchor}" if target_anchor else "")


def _rewrite_markdown_links(markdown: str, repo_dir: str, page_uri: str) -> str:
    def link(match: re.Match) -> str:
        opening, url, closing = match.groups()
        if not _is_relative(url):
            return match.group(0)
        new = _rewrite(url, repo_dir, page_uri)
        if new is not None:
            return opening + new + closing
        if opening.startswith("!"):
            return match.group(0)  # a picture outside the site: MkDocs warns about it
        log.warning("%s links to %s, which the site does not hold: shown as text", page_uri, url)
        text = opening[1:-2]  # no page for it: keep the words, drop the link
        return text if text.startswith("`") else f"`{text}`"

    return _LINK.sub(link, markdown)


def _readme_section(name: str) -> str:
    """The README's opening (``intro``: before its first ``##``) or one ``## name`` section."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    if name == "intro":
        body = readme.split("\n## ", 1)[0]
        return body.split("\n", 1)[1].strip() if body.startswith("# ") else body.strip()
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## |\Z)", readme, re.M | re.S)
    if match is None:
        log.warning("README.md has no section '## %s'", name)
        return f'*(README.md has no section "{name}")*'
    return match.group(1).strip()


def _lesson_list() -> str:
    lines = []
    for path in _lesson_paths():
        lines.append(f"- [{_lesson_title(path)}](../lessons/{path.name})")
    return "\n".join(lines)


def _doc_list(docs_dir: Path) -> str:
    lines = []
    for name in _doc_pages(docs_dir):
        if name == "lessons.md":
            continue
        first = (docs_dir / name).read_text(encoding="utf-8").split("\n", 1)[0]
        title = first[2:].strip() if first.startswith("# ") else name.removesuffix(".md")
        lines.append(f"- [{title}]({name})")
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    uri = page.file.src_uri
    if uri.endswith(".ipynb"):
        return markdown
    if uri == "index.md":

        def include(match: re.Match) -> str:  # the README's links, as if written in docs/
            def relink(link: re.Match) -> str:
                opening, url, closing = link.groups()
                if not _is_relative(url):
                    return link.group(0)
                return opening + posixpath.relpath(posixpath.normpath(url), "docs") + closing

            return _LINK.sub(relink, _readme_section(match.group(1)))

        markdown = _README_INCLUDE.sub(include, markdown)
        picture = next((f for f in files if f.src_uri.startswith(PIPELINE_IMAGE + ".")), None)
        figure = (
            f"![The Mask R-CNN forward pass, drawn by lesson 0]({picture.src_uri})"
            if picture
            else "*(lesson 0's pipeline picture was not found in its saved outputs)*"
        )
        markdown = markdown.replace("<!-- PIPELINE -->", figure)
        markdown = markdown.replace("<!-- LESSONS -->", _lesson_list())
        markdown = markdown.replace("<!-- DOCS -->", _doc_list(Path(config["docs_dir"])))
    return _rewrite_markdown_links(markdown, posixpath.dirname("docs/" + uri), uri)


# --- lesson pages: the note, offline math, links ---------------------------------------------

_MATHJAX = re.compile(r"<!-- Load mathjax -->.*?<!-- End of mathjax configuration -->", re.DOTALL)
_MARKDOWN_CELL = re.compile(
    r'(data-mime-type="text/markdown">)(.*?)(</div>)', re.DOTALL
)  # the rendered markdown of one cell (nbconvert's lab template)
_VERBATIM = re.compile(r"(<pre\b.*?</pre>|<code\b.*?</code>)", re.DOTALL)
_DISPLAY_MATH = re.compile(r"\$\$(.+?)\$\$", re.DOTALL)
# $...$ not touching spaces on the inside; it may wrap onto the next line, not past a blank one.
_INLINE_MATH = re.compile(r"(?<![\\$])\$(?=\S)((?:[^$\n]|\n(?!\s*\n))*?\S)\$(?!\$)")


def _mathml(latex: str, display: str) -> str | None:
    from latex2mathml.converter import convert

    try:
        return convert(html.unescape(latex), display=display)
    except Exception as error:  # keep the TeX, and say which
        log.warning("math not converted (%s): %s", error, latex)
        return None


def _math_to_mathml(fragment: str) -> str:
    def convert_text(text: str) -> str:
        text = _DISPLAY_MATH.sub(lambda m: _mathml(m.group(1), "block") or m.group(0), text)
        return _INLINE_MATH.sub(lambda m: _mathml(m.group(1), "inline") or m.group(0), text)

    pieces = _VERBATIM.split(fragment)  # odd pieces are <pre>/<code>: left as written
    return "".join(p if i % 2 else convert_text(p) for i, p in enumerate(pieces))


_HEADING = re.compile(r'<h[1-6] id="([^"]*)">(.*?)(?:<a class="anchor-link"|</h[1-6]>)', re.DOTALL)
_TAG = re.compile(r"<[^>]+>")


def _flatten(toc) -> list:
    items = []
    for item in toc:
        items.append(item)
        items.extend(_flatten(item.children))
    return items


def _align_toc(toc, content: str) -> None:
    """Point the page's table of contents at the ids the notebook's headings really have.

    mkdocs-jupyter builds the contents from a Markdown copy of the notebook, whose slugs lose
    what was in code spans (``the-code`` for "The code: `minimask.ops.nms`", whose id is
    ``the-code-minimaskopsnms``); the headings keep nbconvert's ids. Matched in order: an
    entry's words are the heading's words, less some.
    """

    def within(short: str, long: str) -> bool:
        words = iter(long.split("-"))
        return all(word in words for word in short.split("-"))  # a subsequence

    headings = _HEADING.findall(content)
    at = 0
    for item in _flatten(toc):
        for j in range(at, len(headings)):
            if within(item.id, headings[j][0]):
                item.id, at = headings[j][0], j + 1
                item.title = html.unescape(_TAG.sub("", headings[j][1])).strip() or item.title
                break
        else:
            log.warning("no heading in the notebook for its contents entry '%s'", item.title)


def _run_it_yourself(name: str) -> str:
    return f"""
<div class="admonition tip run-it-yourself">
<p class="admonition-title">Run it yourself</p>
<p>This page is the notebook <a href="{name}"><code>lessons/{name}</code></a> (download it),
shown with the outputs it was saved with; nothing was re-run to build this page. In a clone of
the repository, after <code>make test</code> has made <code>.venv</code>, open it with
<code>.venv/bin/jupyter lab lessons/{name}</code> and run it top to bottom: it takes under
90 seconds on two CPU cores, and every exercise has a check cell. <code>make lessons</code>
re-runs every lesson in place.</p>
</div>
"""


def on_page_content(content: str, page, config, files) -> str:
    uri = page.file.src_uri
    if not uri.endswith(".ipynb"):
        return content
    content = _MATHJAX.sub("", content)
    _align_toc(page.toc, content)

    def cell(match: re.Match) -> str:
        opening, body, closing = match.groups()
        return opening + _math_to_mathml(body) + closing

    content = _MARKDOWN_CELL.sub(cell, content)

    def url(match: re.Match) -> str:
        opening, target, closing = match.groups()
        if not _is_relative(target):
            return match.group(0)
        new = _rewrite(target, "lessons", uri)
        if new is None:
            log.warning("%s links to %s, which the site does not hold", uri, target)
            return match.group(0)
        path, _, anchor = new.partition("#")
        site_file = files.get_file_from_path(posixpath.normpath(posixpath.join("lessons", path)))
        if site_file is not None:
            new = get_relative_url(site_file.url, page.file.url) + (f"#{anchor}" if anchor else "")
        return opening + new + closing

    content = _HTML_URL.sub(url, content)
    note = _run_it_yourself(Path(uri).name)
    title_end = content.find("</h1>")  # the note goes right under the lesson's title
    if title_end < 0:
        return note + content
    title_end += len("</h1>")
    return content[:title_end] + note + content[title_end:]
