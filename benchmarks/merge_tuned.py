"""Merges a sweep's best configs (gemv_sweep.json) into kernels/tuned_configs.json: python merge_tuned.py TABLE SWEEP."""
import json, sys
table_path, sweep_path = sys.argv[1], sys.argv[2]
t = json.load(open(table_path)); t.update(json.load(open(sweep_path))["tuned"])
json.dump(dict(sorted(t.items())), open(table_path, "w"), indent=1)
