"""A labelled scatter plot as a PNG with the standard library only (zlib + a 3x5 pixel font), so
benchmarks can draw their figure without matplotlib in the environment."""

from __future__ import annotations

import struct
import zlib

# 3x5 glyphs: five rows, each a 3-bit number (4 = left pixel)
FONT = {
    "0": "75557", "1": "26227", "2": "71747", "3": "71717", "4": "55711", "5": "74717", "6": "74757",
    "7": "71111", "8": "75757", "9": "75717", ".": "00002", "%": "51245", "-": "00700", " ": "00000",
    "_": "00007", "/": "11244", "(": "24442", ")": "21112", "=": "07070", "+": "02720", ":": "02020",
    "A": "25755", "B": "65656", "C": "34443", "D": "65556", "E": "74647", "F": "74644", "G": "34553",
    "H": "55755", "I": "72227", "J": "11152", "K": "55655", "L": "44447", "M": "57755", "N": "65555",
    "O": "25552", "P": "65644", "Q": "25563", "R": "65655", "S": "34216", "T": "72222", "U": "55557",
    "V": "55552", "W": "55775", "X": "55255", "Y": "55222", "Z": "71247",
}
COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


class Canvas:
    def __init__(self, w: int, h: int):
        self.w, self.h = w, h
        self.px = bytearray(b"\xff" * (w * h * 3))

    def dot(self, x: int, y: int, c) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = (y * self.w + x) * 3
            self.px[i : i + 3] = bytes(c)

    def rect(self, x0: int, y0: int, x1: int, y1: int, c) -> None:
        for y in range(y0, y1):
            for x in range(x0, x1):
                self.dot(x, y, c)

    def text(self, x: int, y: int, s: str, c=(0, 0, 0), *, scale: int = 2) -> None:
        for ch in s.upper():
            for r, bits in enumerate(FONT.get(ch, FONT[" "])):
                for col in range(3):
                    if int(bits) & (4 >> col):
                        self.rect(x + col * scale, y + r * scale, x + (col + 1) * scale, y + (r + 1) * scale, c)
            x += 4 * scale

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[y * self.w * 3 : (y + 1) * self.w * 3]) for y in range(self.h))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        head = struct.pack(">IIBBBBB", self.w, self.h, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def scatter_png(points: dict[str, tuple[float, float]], path: str, *, xlabel: str, ylabel: str,
                w: int = 640, h: int = 400) -> None:
    """One labelled point per name, axes from 0 with 5 ticks each."""
    cv = Canvas(w, h)
    left, right, top, bottom = 70, w - 20, 40, h - 50
    xmax = max(x for x, _ in points.values()) * 1.15 or 1.0
    ymax = max(y for _, y in points.values()) * 1.15 or 1.0
    sx = lambda x: int(left + (right - left) * x / xmax)  # noqa: E731
    sy = lambda y: int(bottom - (bottom - top) * y / ymax)  # noqa: E731
    grey = (120, 120, 120)
    cv.rect(left, top, left + 1, bottom + 1, grey)
    cv.rect(left, bottom, right, bottom + 1, grey)
    for i in range(6):
        xv, yv = xmax * i / 5, ymax * i / 5
        cv.rect(sx(xv), bottom, sx(xv) + 1, bottom + 5, grey)
        label = f"{xv:.0f}"
        cv.text(min(sx(xv) - 4 * len(label), w - 8 * len(label) - 2), bottom + 10, label, grey)
        cv.rect(left - 5, sy(yv), left, sy(yv) + 1, grey)
        cv.text(8, sy(yv) - 5, f"{yv:.1f}", grey)
    cv.text(left + (right - left) // 2 - 4 * 2 * len(xlabel) // 2, h - 22, xlabel)
    cv.text(left, 12, ylabel)
    for i, (name, (x, y)) in enumerate(points.items()):
        c = COLORS[i % len(COLORS)]
        cv.rect(sx(x) - 4, sy(y) - 4, sx(x) + 5, sy(y) + 5, c)
        cv.text(min(sx(x) + 9, w - 8 * len(name) - 2), sy(y) - 5, name, c)
    with open(path, "wb") as f:
        f.write(cv.png())
