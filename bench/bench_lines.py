"""The JSON objects `tunestudio bench --json` printed, one per line, from files (or stdin); other
lines (logs interleaved by a device script) are skipped."""
import json


def read(paths):
    for path in paths or ["/dev/stdin"]:
        for line in open(path):
            line = line.strip()
            if line.startswith("{"):
                yield json.loads(line)
