"""report.html (issue 14 §2): report.md's tables and the plots in one self-contained page, parsed with the stdlib."""

from __future__ import annotations

import base64
from html.parser import HTMLParser

from tmtseg.tools.bench.tables import write_report


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tables, self.images, self.links, self.headings = [], [], [], []
        self._row, self._cell, self._in = None, None, []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self._in.append(tag)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._row = []
            self.tables[-1].append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self._in.pop()  # a void element
            self.images.append(attrs["src"])
        elif tag in ("a", "link", "script"):
            self.links.append(attrs)

    def handle_endtag(self, tag):
        if self._in and self._in[-1] == tag:
            self._in.pop()
        if tag in ("td", "th"):
            self._row.append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._in and self._in[-1] in ("h1", "h2"):
            self.headings.append(data.strip())


def test_report_html_holds_the_tables_and_embedded_plots(tmp_path):
    cells, done = [], {}
    for pair, by_method in {"a->b": {"finetune": [50, 52], "tmt": [55, 57]}, "c->d": {"finetune": [40, 41]}}.items():
        for method, vals in by_method.items():
            for seed, v in enumerate(vals):
                key = f"t/{pair}/{method}/{seed}"
                cells.append(("t", pair, method, seed, key))
                done[key] = {"metrics": {"mIoU": float(v)}, "method": method, "wall_s": 3.0}
    write_report(cells, done, list(done), tmp_path, baseline="finetune", title="Bench <t>", header="h & `x`")
    md = (tmp_path / "report.md").read_text()
    page = _Page()
    page.feed((tmp_path / "report.html").read_text())
    page.close()

    assert page.headings[0] == "Bench <t>"  # escaped in the file, the same text once parsed
    md_tables = md.count("\n|---")
    assert len(page.tables) == md_tables == 3  # scores, deltas, cost
    scores = page.tables[0]
    assert scores[0][:3] == ["method", "a->b", "c->d"]
    assert ["tmt", "56.00 ± 1.41", "–"] == scores[2][:3]
    # two plots, embedded: nothing is fetched from elsewhere
    assert len(page.images) == 2 and not page.links
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
