"""Users' text files (caption lists, pairs, STS and annotation files): UTF-8, read as a text-mode ``open``
reads them, a bad byte named by its line and offset (``open``'s own error counts from a read buffer)."""

import io


class NotUTF8(ValueError):
    def __init__(self, line, offset, byte, reason):
        super().__init__(f"line {line}: byte {byte:#04x} at offset {offset} is not UTF-8 ({reason})")
        self.line, self.offset, self.byte, self.reason = line, offset, byte, reason


def decode_utf8(data):
    """``data`` decoded; ``NotUTF8`` naming the line (as ``lines_of`` counts them) of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = sum(text.endswith("\n") for text in lines_of(data[: e.start].decode("utf-8"))) + 1
        raise NotUTF8(line, e.start, data[e.start], e.reason) from None


def read_utf8(path):
    """The whole file decoded; ``NotUTF8`` (``decode_utf8``) or the ``OSError`` of reading it."""
    with open(path, "rb") as f:
        return decode_utf8(f.read())


def lines_of(text):
    """The lines of ``text`` as ``for line in open(path)`` gives them: split at ``\\n``, ``\\r\\n`` and ``\\r`` only
    (unlike ``str.splitlines``), each line end read as ``\\n``."""
    return list(io.StringIO(text, newline=None))
