"""``mapd report``: a self-contained report.html (plots inline as PNG) and a short report.md.

The input is a full ``mapd run`` folder (manifest.json + round-N/) or one round folder made by
``mapd teach`` / ``mapd import-reference``. The report shows what is there and says plainly what
is absent; artifacts may be mid-write, so a partial last JSONL line is dropped. Every artifact is
read as its typed record (mapd.records), so a malformed line is one error naming ``file:line: field``;
every file name comes from mapd.layout.

Three steps, one module each: ``load`` reads the run folder into typed objects, ``analyse`` turns them
into sections of numbers and tables, ``render`` writes them as Markdown and HTML with plots.
"""

from mapd.report.analyse import answer_kind, eval_summary
from mapd.report.render import write_report

__all__ = ["answer_kind", "eval_summary", "write_report"]
