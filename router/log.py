"""Router logging: plain text, or one JSON object per line (--json-output).

Lines written while serving a request carry its X-Request-Id (router/request_id.py): a
`request_id` field in JSON, a `[request_id=…]` suffix in text.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from router import request_id


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being served (None outside requests)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.CURRENT.get()
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if getattr(record, "request_id", None):
            entry["request_id"] = record.request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s router %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        rid = getattr(record, "request_id", None)
        return f"{line} [request_id={rid}]" if rid else line


def setup_logging(level: str, json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_output else TextFormatter())
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
