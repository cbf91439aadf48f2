"""`qruntime bench`: decode latency against the theoretical figures B and W (THEORY.md), on the
user's own card. theory.py holds the arithmetic, fit.py the line fit, measure.py the timing,
report.py the table/JSON/plot."""
