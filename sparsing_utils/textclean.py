"""Markup -> plain English text, for the training corpus (``scripts/build_corpus.py``).

One converter per markup, all in :data:`CONVERTERS` (``html``, ``mallard``, ``rst``, ``pod``,
``man``, ``info``, ``fortune``, ``text``); :func:`to_text` picks one by name and then
:func:`tidy` normalizes whitespace. Every converter is deterministic (standard library only) and
keeps the prose; what it drops is listed beside it:

- ``html``: ``<head>``, scripts, styles, ``<nav>``/``<header>``/``<footer>``, forms, SVG/MathML,
  and any element whose ``class``/``id``/``role`` names navigation (Sphinx ``related``/
  ``sphinxsidebar``/``headerlink``, DocBook ``navheader``/``navfooter``/``toc``, mdBook/rustdoc
  sidebars, breadcrumbs, search boxes). Code blocks (``<pre>``) are KEPT verbatim: technical
  manuals interleave prose and short examples, and the examples are part of the text.
- ``mallard`` (GNOME help ``.page`` XML): as ``html``, and the ``<info>`` block (credits, links,
  licence) is dropped.
- ``rst`` (Sphinx ``_sources/*.rst.txt``): section underlines, comments and link targets, and the
  bodies of non-prose directives (``toctree``, ``index``, ``image``, ``kernel-doc``, ...) are dropped;
  roles (``:func:`x```), inline markup and hyperlink syntax are reduced to their text; other
  directives keep their argument (e.g. a function signature) and body (code blocks included).
- ``pod`` (Perl documentation): commands become headings/items, formatting codes their text,
  ``=begin``/``=end`` and ``=for`` blocks are dropped; verbatim (code) paragraphs are kept.
- ``man`` (roff ``man`` pages): comments, requests without text, font and size escapes are dropped;
  ``.SH``/``.SS`` headings, ``.B``/``.I``/``.BR``... text and special characters are kept.
- ``info`` (Texinfo ``.info``): node headers, menus, tag tables and indirect tables are dropped.
- ``fortune``: the ``%`` separators of a fortune cookie file become blank lines.
- ``text``: plain text, only tidied.

:func:`english_score` (share of words that are common English function words) is the filter
the corpus builder uses to drop pages that are not in English.
"""
from __future__ import annotations

import html
import html.parser
import re
from collections.abc import Callable

__all__ = ["CONVERTERS", "english_score", "tidy", "to_text"]

# ----------------------------------------------------------------------------------------
# whitespace
# ----------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_BLANKS = re.compile(r"\n{3,}")


def tidy(text: str) -> str:
    """Normalize whitespace: ``\\r\\n`` and ``\\r`` -> ``\\n``, tabs kept, other control characters
    removed, trailing spaces stripped, at most one blank line in a row, no leading/trailing blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    text = _CONTROL.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _BLANKS.sub("\n\n", text).strip("\n")


# ----------------------------------------------------------------------------------------
# HTML and Mallard
# ----------------------------------------------------------------------------------------

_SKIP_TAGS = {"head", "script", "style", "nav", "header", "footer", "noscript", "svg", "math", "form",
              "button", "select", "textarea", "template", "iframe", "object"}
# class / id / role tokens (whole tokens, compared in lower case) that mark navigation and chrome
_SKIP_MARKER_WORDS = (
    "related sphinxsidebar sphinxsidebarwrapper sidebar sidebar-scrollbox navheader navfooter navigation "
    "navbar nav breadcrumb breadcrumbs toc headerlink footer searchbox search menu menu-bar sidetoc "
    "nav-chapters nav-wrapper mobile-nav-chapters skip-link toctree-wrapper rustdoc-breadcrumbs banner "
    "docnav"
)
_SKIP_MARKERS = frozenset(_SKIP_MARKER_WORDS.split())
_BLOCK_TAGS = {"p", "div", "section", "article", "main", "aside", "blockquote", "dl", "dt", "dd", "ul", "ol",
               "table", "thead", "tbody", "tr", "caption", "figure", "figcaption", "address", "center",
               "h1", "h2", "h3", "h4", "h5", "h6", "hr", "pre", "li",
               # Mallard / DocBook XML
               "title", "subtitle", "item", "note", "steps", "terms", "list", "tree", "listing", "synopsis",
               "desc", "example", "screen", "page", "links"}
_EMPTY_BULLET = re.compile(r"(?m)^- *\n(?:[ \t]*\n)*(?=\S)")
_VOID_TAGS = {"br", "img", "hr", "meta", "link", "input", "wbr", "col", "area", "base", "source", "track",
              "embed", "param"}


class _HTMLText(html.parser.HTMLParser):
    """Collects the visible text of a page, with paragraph breaks at block elements."""

    def __init__(self, extra_skip: frozenset[str] = frozenset()):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_tag: str | None = None  # the tag that opened the skipped region
        self.skip_depth = 0
        self.pre_depth = 0
        self.skip_tags = _SKIP_TAGS | extra_skip

    def _skips(self, tag: str, attrs: list[tuple[str, str | None]]) -> bool:
        if tag in self.skip_tags:
            return True
        for name, value in attrs:
            if name in {"class", "id", "role"} and value and not _SKIP_MARKERS.isdisjoint(value.lower().split()):
                return True
        return False

    def handle_starttag(self, tag, attrs):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth += 1
            return
        if tag not in _VOID_TAGS and self._skips(tag, attrs):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag == "br":
            self.parts.append("\n")
        elif tag == "li" or tag == "item":
            self.parts.append("\n\n- ")
        elif tag in {"td", "th"}:
            self.parts.append(" ")
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        if tag in {"pre", "screen", "listing", "synopsis"}:
            self.pre_depth += 1

    def handle_startendtag(self, tag, attrs):
        if self.skip_tag is None and tag == "br":
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in {"pre", "screen", "listing", "synopsis"} and self.pre_depth:
            self.pre_depth -= 1
        if tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if self.skip_tag is not None:
            return
        if self.pre_depth:
            self.parts.append(data)
        else:
            self.parts.append(re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = "".join(self.parts).split("\n")
        # inside paragraphs the collapsed runs leave lines that start with a space
        text = "\n".join(line if line.startswith("    ") else line.strip() for line in lines)
        return _EMPTY_BULLET.sub("- ", text)  # "<li><p>x" -> "- x", not "-" and "x" on separate lines


def html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    parser.close()
    return parser.text()


def mallard_to_text(source: str) -> str:
    parser = _HTMLText(extra_skip=frozenset({"info"}))
    parser.feed(source)
    parser.close()
    return parser.text()


# ----------------------------------------------------------------------------------------
# reStructuredText
# ----------------------------------------------------------------------------------------

_RST_DROP_DIRECTIVES = {"toctree", "index", "highlight", "only", "image", "figure", "kernel-doc", "contents",
                        "sectionauthor", "moduleauthor", "codeauthor", "tabularcolumns", "raw", "include",
                        "literalinclude", "testsetup", "testcleanup", "autosummary", "currentmodule", "module",
                        "meta", "highlightlang", "default-role", "sectnum", "graphviz", "kernel-figure",
                        "kernel-include", "kernel-render", "kernel-feat", "kernel-abi", "cssclass", "rst-class",
                        "ipython", "plot", "audit-event-table", "audit-event", "impl-detail", "program",
                        "opcode", "glossary"}
_RST_DIRECTIVE = re.compile(r"^(\s*)\.\.\s+([\w:-]+)::\s*(.*)$")
_RST_COMMENT = re.compile(r"^(\s*)\.\.(\s|$)")
_RST_UNDERLINE = re.compile(r"^([=\-~^\"'`#*+_.:<>])\1{2,}\s*$")
_RST_ROLE = re.compile(r":[\w:+.-]+:`(?:([^`<]*?)\s*<[^`>]*>|~?!?([^`]*))`")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_RST_REF = re.compile(r"`([^`]+)`_{1,2}")
_RST_LITERAL = re.compile(r"``(.+?)``")
_RST_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")
_RST_EMPH = re.compile(r"(?<![\w*])\*(\S(?:[^*]*?\S)?)\*(?![\w*])")
_RST_FOOTREF = re.compile(r"\s?\[(?:#\w*|\*|\d+)\]_")
_RST_OPTION = re.compile(r"^\s+:[\w -]+:")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def rst_to_text(source: str) -> str:
    out: list[str] = []
    lines = source.expandtabs(8).split("\n")
    i, n = 0, len(lines)
    while i < n:
        line = lines[i]
        m = _RST_DIRECTIVE.match(line)
        if m or _RST_COMMENT.match(line):
            base = _indent(line)
            name = m.group(2).split(":")[-1] if m else None
            drop_body = m is None or name in _RST_DROP_DIRECTIVES
            if m and not drop_body and m.group(3):
                out.append(" " * base + m.group(3))
            i += 1
            # options right after the directive line
            while i < n and lines[i].strip() and _RST_OPTION.match(lines[i]) and _indent(lines[i]) > base:
                i += 1
            # the body: blank lines and lines indented deeper than the directive
            while i < n and (not lines[i].strip() or _indent(lines[i]) > base):
                if not drop_body:
                    out.append(lines[i])
                i += 1
            continue
        if _RST_UNDERLINE.match(line):
            i += 1
            continue
        if line.strip() == "::":
            i += 1
            continue
        if line.endswith("::"):
            line = line[:-1]
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = _RST_ROLE.sub(lambda m: m.group(1) if m.group(1) is not None else m.group(2), text)
    text = _RST_LINK.sub(r"\1", text)
    text = _RST_REF.sub(r"\1", text)
    text = _RST_LITERAL.sub(r"\1", text)
    text = _RST_STRONG.sub(r"\1", text)
    text = _RST_EMPH.sub(r"\1", text)
    text = _RST_FOOTREF.sub("", text)
    return text


# ----------------------------------------------------------------------------------------
# POD
# ----------------------------------------------------------------------------------------

_POD_CODE = re.compile(r"([BICFSLEXZ])<([^<>]*)>")
_POD_ENTITIES = {"lt": "\ue000", "gt": "\ue001", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}
_POD_ANGLES = str.maketrans({"<": "\ue000", ">": "\ue001"})  # stand-ins, restored at the end


def _pod_code(m: re.Match) -> str:
    code, body = m.group(1), m.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        if body in _POD_ENTITIES:
            return _POD_ENTITIES[body]
        if body.isdigit():
            return chr(int(body)).translate(_POD_ANGLES)
        if body.lower().startswith("0x"):
            return chr(int(body, 16)).translate(_POD_ANGLES)
        return html.unescape(f"&{body};").translate(_POD_ANGLES)
    if code == "L":
        text = body.split("|", 1)[0] if "|" in body else body
        return text.replace('"', "")
    return body


def _pod_inline(text: str) -> str:
    # C<< $x->y >>: the body may hold < and >; longest delimiters first
    for n in (5, 4, 3, 2):
        text = re.sub(rf"([BICFSLEXZ])<{{{n}}}\s+(.*?)\s+>{{{n}}}",
                      lambda m: f"{m.group(1)}<{m.group(2).translate(_POD_ANGLES)}>", text, flags=re.DOTALL)
    for _ in range(10):  # innermost codes first
        new = _POD_CODE.sub(_pod_code, text)
        if new == text:
            break
        text = new
    return text.replace("\ue000", "<").replace("\ue001", ">")


def pod_to_text(source: str) -> str:
    out: list[str] = []
    paragraphs = re.split(r"\n[ \t]*\n", source.replace("\r\n", "\n"))
    in_pod, skipping = True, None  # a .pod file starts in POD
    for para in paragraphs:
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command = command.split("\n")[0]
            rest = para[1 + len(command):].strip()
            if skipping is not None:
                if command == "end" and rest.split()[:1] == [skipping]:
                    skipping = None
                continue
            if command == "cut":
                in_pod = False
            elif command in {"pod", "encoding", "over", "back"}:
                in_pod = True
            elif command == "begin":
                skipping = (rest.split() or [""])[0]
            elif command == "for":
                pass
            elif command.startswith("head"):
                in_pod = True
                out.append(_pod_inline(rest))
            elif command == "item":
                out.append("- " + _pod_inline(rest.lstrip("*").strip()) if rest.strip() not in {"*", ""} else "-")
            continue
        if not in_pod or skipping is not None:
            continue
        if para[:1] in {" ", "\t"}:
            out.append(para)  # verbatim paragraph (code)
        else:
            out.append(_pod_inline(para))
    return "\n\n".join(out)


# ----------------------------------------------------------------------------------------
# man (roff)
# ----------------------------------------------------------------------------------------

_ROFF_CHARS = {"em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
               "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
               "hy": "-", "mi": "-", "pl": "+", "mu": "\u00d7", "di": "\u00f7", "+-": "\u00b1", "<=": "\u2264",
               ">=": "\u2265", "!=": "\u2260", "->": "\u2192", "<-": "\u2190", "de": "\u00b0", "ti": "~",
               "ha": "^", "rs": "\\", "sl": "/", "ba": "|", "or": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}",
               "at": "@", "sh": "#", "Do": "$", "eu": "\u20ac", "Eu": "\u20ac", "ss": "\u00df", "ga": "`",
               "aa": "\u00b4", "ul": "_", "fm": "\u2032", "sc": "\u00a7", "ps": "\u00b6", "dg": "\u2020"}
_ROFF_STRINGS = {"lq": "\u201c", "rq": "\u201d", "R": "\u00ae", "Tm": "\u2122", "(lq": "\u201c", "(rq": "\u201d"}
_ROFF_ESCAPE = re.compile(
    r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?(?:\d|\(\d\d|\[\d+\])|\((..)|\[([^\]]*)\]|\*(?:\((..)|\[([^\]]*)\]|(.))"
    r"|([-e&|^~ %c:0/,!)d u]|\"))"
)
_ROFF_FONT_MACROS = {"B", "I", "BR", "RB", "BI", "IB", "IR", "RI", "SM", "SB", "R", "CW", "UR", "MT", "Nm", "Ar",
                     "Fl", "Cm", "Pa", "Va", "Fn", "Xr", "Dv", "Er", "Ev", "Ic", "Li", "Sy", "Em", "Dq", "Sq",
                     "Ql", "Op", "Ft", "Fa", "Fd", "Vt", "Ad", "An", "Lk", "Nd"}
_ROFF_HEADINGS = {"SH", "SS", "Sh", "Ss"}
_ROFF_PARAGRAPHS = {"PP", "LP", "P", "TP", "HP", "IP", "Pp", "Bl", "El", "It", "sp", "br", "TQ", "UE", "ME", "EE",
                    "EX", "RS", "RE", "nf", "fi"}


def _roff_escape(m: re.Match) -> str:
    named, bracket, sname, sbracket, sone, single = m.group(1, 2, 3, 4, 5, 6)
    if named is not None:
        return _ROFF_CHARS.get(named, "")
    if bracket is not None:
        if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", bracket):
            return chr(int(bracket[1:], 16))
        return _ROFF_CHARS.get(bracket, "")
    for s in (sname, sbracket, sone):
        if s is not None:
            return _ROFF_STRINGS.get(s, "")
    if single is not None:
        return {"-": "-", "e": "\\", " ": " ", "~": " ", "0": " ", '"': "", "d": "", "u": ""}.get(single, "")
    return ""  # font / size changes


def _roff_args(rest: str) -> list[str]:
    return [a[1:-1] if len(a) > 1 and a.startswith('"') and a.endswith('"') else a
            for a in re.findall(r'"[^"]*"|\S+', rest)]


def man_to_text(source: str) -> str:
    """Filled text (``.fi``, the default) is joined into one line per paragraph, as a man page
    shows it; no-fill regions (``.nf``/``.EX``: synopses, examples) keep their lines."""
    out: list[str] = []
    para: list[str] = []
    fill = True

    def flush():
        if para:
            out.append(" ".join(para))
            para.clear()

    def emit(text: str):
        if fill:
            para.append(text)
        else:
            out.append(text)

    source = re.sub(r"(?<!\\)\\\n", "", source.replace("\r\n", "\n"))  # escaped newline: continuation
    for raw in source.split("\n"):
        if raw.startswith((".\\\"", "'\\\"", "\\\"", ".\\#")) or raw.strip() in {".", "'"}:
            continue
        if raw.startswith((".", "'")):
            name, _, rest = raw[1:].lstrip().partition(" ")
            if name == "so":
                return ""  # a redirect to another page: no text of its own
            if name in _ROFF_HEADINGS:
                flush()
                out += ["", " ".join(_roff_args(rest)), ""]
            elif name in _ROFF_FONT_MACROS:
                args = _roff_args(rest)
                alternating = len(name) == 2 and name.isupper() and name not in {"SM", "SB", "CW", "UR", "MT"}
                if args:
                    emit(("" if alternating else " ").join(args))
            elif name in {"IP", "TP", "HP"}:
                flush()
                out.append("")
                args = _roff_args(rest)
                if name == "IP" and args:
                    out.append(args[0])
            elif name in {"nf", "EX"}:
                flush()
                fill = False
            elif name in {"fi", "EE"}:
                fill = True
            elif name in _ROFF_PARAGRAPHS:
                flush()
                out.append("")
            # every other request (.TH, .ad, .in, .de, ...) carries no prose
            continue
        if not raw.strip():
            flush()
            out.append("")
        else:
            emit(raw)
    flush()
    return _ROFF_ESCAPE.sub(_roff_escape, "\n".join(out))


# ----------------------------------------------------------------------------------------
# info, fortune, text
# ----------------------------------------------------------------------------------------


def info_to_text(source: str) -> str:
    out: list[str] = []
    for node in source.split("\x1f"):
        node = node.lstrip("\n\f")
        if node.lower().startswith(("tag table:", "indirect:", "end tag table", "local variables")):
            continue
        lines = node.split("\n")
        if lines and lines[0].startswith("File:") and "Node:" in lines[0]:
            lines = lines[1:]
        kept, in_menu = [], False
        for line in lines:
            if line.startswith("* Menu:"):
                in_menu = True
                continue
            if in_menu:
                if line.startswith(("* ", " ")) or not line.strip():
                    continue
                in_menu = False
            if (line.startswith("This is ") and "produced by makeinfo" in line) or line.startswith("Info file:"):
                continue
            kept.append(line)
        out.append("\n".join(kept))
    text = "\n\n".join(out)
    return re.sub(r"\*[Nn]ote ([^:]*)::", r"see \1", text)


def fortune_to_text(source: str) -> str:
    return re.sub(r"(?m)^%%?\s*$", "", source)


def text_to_text(source: str) -> str:
    return source


CONVERTERS: dict[str, Callable[[str], str]] = {
    "html": html_to_text,
    "mallard": mallard_to_text,
    "rst": rst_to_text,
    "pod": pod_to_text,
    "man": man_to_text,
    "info": info_to_text,
    "fortune": fortune_to_text,
    "text": text_to_text,
}


def to_text(source: str, markup: str) -> str:
    """``source`` in ``markup`` (a key of :data:`CONVERTERS`) -> tidy plain text."""
    try:
        convert = CONVERTERS[markup]
    except KeyError:
        raise ValueError(f"unknown markup {markup!r}; known: {sorted(CONVERTERS)}") from None
    return tidy(convert(source))


# ----------------------------------------------------------------------------------------
# language filter
# ----------------------------------------------------------------------------------------

_FUNCTION_WORD_LIST = (
    "the of and to a in is that it for as with was on be by this are or not from at an which have you if "
    "can but all will one has when there their they its we more these other been also only use used may "
    "would then so than into each such should must what how does do any"
)
_FUNCTION_WORDS = frozenset(_FUNCTION_WORD_LIST.split())
_WORD = re.compile(r"[A-Za-z]+")


def english_score(text: str) -> float:
    """The share of the alphabetic words of ``text`` that are common English function words
    (about 0.3-0.45 in English prose, 0.15-0.3 in technical English, below 0.05 in other languages;
    0.0 for text without words)."""
    words = _WORD.findall(text)
    if not words:
        return 0.0
    return sum(w.lower() in _FUNCTION_WORDS for w in words) / len(words)
