"""Print one line per package of a `pip install --dry-run --report -` report read from stdin."""

import json
import sys

report = json.load(sys.stdin)
step = sys.argv[1] if len(sys.argv) > 1 else "install"
names = sorted(f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report["install"])
print(f"{step}: {len(names)} packages resolve from PyPI alone: {' '.join(names)}")
