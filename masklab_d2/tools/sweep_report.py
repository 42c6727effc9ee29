"""The sweep report; moved to :mod:`masklab_d2.tools.sweeps.report` (kept for old imports)."""

from masklab_d2.tools.sweeps.report import write_report

__all__ = ["write_report"]
