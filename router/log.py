"""Router logging: plain text, or one JSON object per line (--json-output).

Lines written while serving a request carry its X-Request-Id (router/request_id.py): a
`request_id` field in JSON, a `[request_id=…]` suffix in text.

Log lines hold client-controlled text (paths, ids, header values, model names, error messages).
A newline in it could forge a log line, an ESC could drive the reader's terminal. JSON output
escapes every control character already (json.dumps); the text formatter escapes them in the
message, and in a traceback keeps only its newlines (see TextFormatter).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from router import request_id

# C0 controls, DEL, C1 controls and the Unicode line/paragraph separators (str.splitlines breaks
# lines at several of these, terminals act on the others).
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROLS_BUT_NEWLINE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")


def _escape(match: re.Match) -> str:
    return match.group().encode("unicode_escape").decode("ascii")  # "\n" → "\\n", ESC → "\\x1b"


def escape_controls(text: str) -> str:
    """`text` on one line, its control characters shown as Python escapes."""
    return _CONTROLS.sub(_escape, text)


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
        return json.dumps(entry)  # ensure_ascii: every control character (and all non-ASCII) escaped


class TextFormatter(logging.Formatter):
    """One line per record, plus the traceback's own lines. NOTE: only the framework's newlines
    survive: the message (and so every argument in it) is escaped whole, a traceback keeps its
    newlines but loses its other controls. An exception's message inside a traceback can still
    hold a newline: log client text through the message's arguments, not in an exception alone."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s router %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = escape_controls(super().formatMessage(record))
        rid = getattr(record, "request_id", None)  # valid ids are printable ASCII (request_id.py)
        return f"{line} [request_id={rid}]" if rid else line

    def formatException(self, ei) -> str:
        return _CONTROLS_BUT_NEWLINE.sub(_escape, super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return _CONTROLS_BUT_NEWLINE.sub(_escape, super().formatStack(stack_info))


def setup_logging(level: str, json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if json_output else TextFormatter())
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
