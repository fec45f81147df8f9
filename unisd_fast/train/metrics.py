"""metrics.jsonl: one JSON object per training step, per evaluation and per finished run
(docs/trainer.md, "Outputs")."""

from __future__ import annotations

import json
from pathlib import Path


class Metrics:
    """The run's records, each appended to metrics.jsonl as it comes."""

    def __init__(self, path: Path | None, records: list[dict]):
        """``records``: a resumed run's (written afresh); ``path`` None: keep the records
        without writing (ranks other than 0)."""
        self.path, self.records = path, records
        if path is not None:
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def append_summary(output_dir, record: dict) -> None:
    with (Path(output_dir) / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"kind": "summary", **record}) + "\n")
