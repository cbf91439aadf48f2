"""Merges a sweep's best configs (gemv_sweep.json) into a card's table (created if new):

    python merge_tuned.py kernels/tuned/<card>.json SWEEP
"""
import json, os, sys
table_path, sweep_path = sys.argv[1], sys.argv[2]
t = json.load(open(table_path)) if os.path.isfile(table_path) else {}
t.update(json.load(open(sweep_path))["tuned"])
json.dump(dict(sorted(t.items())), open(table_path, "w"), indent=1)
