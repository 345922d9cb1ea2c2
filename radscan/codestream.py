"""What a compressed frame says of itself: the image size, components and sample precision that a
JPEG, JPEG-LS or JPEG 2000 codestream declares in its own header, read before any decoder runs.

DICOM's Rows, Columns, Samples per Pixel and Bits Stored describe the pixel data, and for
encapsulated transfer syntaxes the codestream must agree with them (PS3.5 8.2.1, 8.2.3, 8.2.4). When
it does not, a decoder allocates what the codestream says (a 7.8 KB file whose JPEG 2000 header
declares 20000 x 20000 took 2.3 GB) or fails with a message for programmers. radscan reads the
codestream's own header first (radscan.dicom), so that such a file is an error that says what
disagrees, before memory is committed.

Markers: ITU-T T.81 B.2.2 (SOFn: P, Y, X, Nf), ITU-T T.87 / ISO 14495-1 C.2.2 (SOF55, same layout),
ITU-T T.800 / ISO 15444-1 A.5.1 (SIZ: Xsiz, Ysiz, XOsiz, YOsiz, Csiz, Ssiz), and the JP2 file format's
boxes (ISO 15444-1 I.4), inside which the codestream may come.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["StreamHeader", "stream_header"]

_SOI, _SOC_SIZ = b"\xff\xd8", b"\xff\x4f\xff\x51"
# start-of-frame markers: baseline, extended, progressive, lossless (T.81 Table B.1) and JPEG-LS (0xF7);
# not DHT (C4), JPG (C8) or DAC (CC), which share the range
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length
_SEARCHED = 1 << 16  # bytes of a frame searched for its header (a JP2's boxes or JPEG's APPn come first)


@dataclass(frozen=True)
class StreamHeader:
    """A codestream's own description of its image: `width` and `height` in pixels, `components`
    (1 grey, 3 colour) and `precision` in bits per sample (of the first component)."""

    width: int
    height: int
    components: int
    precision: int


def stream_header(frame: bytes) -> StreamHeader | None:
    """The header of the JPEG, JPEG-LS or JPEG 2000 codestream that `frame` (the bytes of one
    compressed frame, or its first fragment) begins with, or None when it is none of those or its
    header cannot be found in its first 64 KiB (RLE, a damaged stream: left to the decoder)."""
    head = bytes(frame[:_SEARCHED])
    if head.startswith(_SOI):
        return _jpeg_header(head)
    start = head.find(_SOC_SIZ)  # a raw codestream begins with it; a JP2 file holds it in its jp2c box
    if start == 0 or (start > 0 and head[4:8] == b"jP  "):
        return _siz_header(head, start + 4)
    return None


def _jpeg_header(data: bytes) -> StreamHeader | None:
    """The frame header (SOFn or SOF55) of a JPEG or JPEG-LS stream: walk the marker segments."""
    at = 2
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill bytes before a marker (T.81 B.1.1.2)
            at += 1
            continue
        if marker in _STANDALONE:
            at += 2
            continue
        length = int.from_bytes(data[at + 2:at + 4], "big")
        if marker in _SOF:
            segment = data[at + 4:at + 2 + length]
            if len(segment) < 6:
                return None
            return StreamHeader(width=int.from_bytes(segment[3:5], "big"), height=int.from_bytes(segment[1:3], "big"),
                                components=segment[5], precision=segment[0])
        if marker == 0xDA or length < 2:  # scan data before any frame header, or a broken length
            return None
        at += 2 + length
    return None


def _siz_header(data: bytes, at: int) -> StreamHeader | None:
    """The SIZ segment of a JPEG 2000 codestream, whose marker (0xFF51) ends at `at`."""
    segment = data[at:at + 2 + 38 + 3]
    if len(segment) < 2 + 38 + 1:
        return None
    xsiz, ysiz, x_offset, y_offset = (int.from_bytes(segment[i:i + 4], "big") for i in (4, 8, 12, 16))
    components = int.from_bytes(segment[36:38], "big")
    return StreamHeader(width=max(0, xsiz - x_offset), height=max(0, ysiz - y_offset), components=components,
                        precision=(segment[38] & 0x7F) + 1)
