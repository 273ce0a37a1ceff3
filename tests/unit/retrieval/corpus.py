"""Small in-test documents for the retrieval tests, written here (no data files from outside the repository)."""

from __future__ import annotations

MARKDOWN = """# Widget manual

The widget is a small device that measures humidity in greenhouses.

## Installation

Unpack the widget and mount it on a wall away from direct sunlight. Connect the power cable.

## Calibration

Hold the reset button for five seconds. The status light blinks green when calibration is done.
"""

HTML = """<html><head><title>Weather station</title></head><body>
<nav><a href="/">Home</a> | <a href="/shop">Shop cookie banner navigation</a></nav>
<article><h1>Weather station guide</h1>
<p>The weather station records rainfall, wind speed and barometric pressure every minute.</p>
<h2>Batteries</h2><p>Replace the lithium batteries every winter before the first frost.</p></article>
<footer>Copyright footer boilerplate text</footer></body></html>"""

PLAIN = [
    "Volcanoes erupt when magma rises through cracks in the crust of the earth.",
    "Penguins are flightless birds that live in the southern hemisphere and swim well.",
    "The recipe needs flour, butter, sugar and two eggs; bake the cake for forty minutes.",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
]


def pdf_bytes(text: str) -> bytes:
    """A one-page PDF whose page shows `text` in Helvetica (a valid xref table, built by hand)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)
