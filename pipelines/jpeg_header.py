"""A lean JPEG header reader for the index: size and EXIF orientation of regular files.

`jpeg_size` walks the markers from SOI to SOS and reads the EXIF
orientation from APP1's TIFF IFD0, about 10 us a file where PIL's
`Image.open` + `getexif` takes about 100 us. It answers only for files
whose header it can vouch for, where PIL reads the same size and
orientation; for anything irregular it returns None and the caller asks PIL
(pipelines/index.py `probe_file`). Irregular here means anything PIL treats in
a way this reader does not copy: fill bytes or junk between markers,
markers without a length, a segment running past the data, a bad
quantization table, an SOF of other than 8 bits or 1, 3, 4 components, an
MPO (APP2 'MPF'), a Photoshop APP13, more than one EXIF segment, an EXIF
IFD that PIL would stop reading early, an irregular Orientation,
ResolutionUnit or XResolution entry (PIL reads the last two while opening),
XMP without an EXIF orientation (PIL then looks in the XMP), and images
above PIL's decompression-bomb limit. tests/pipelines/test_index.py checks
it against PIL on varied and damaged files.
"""
from __future__ import annotations

import struct
from typing import Callable, Optional

from PIL import Image

_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_SKIPPED = frozenset({0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE} | set(range(0xE0, 0xF0)))  # read, not looked into
_SOS = 0xDA
_DQT = 0xDB
_ORIENTATION, _RESOLUTION_UNIT, _X_RESOLUTION = 0x0112, 0x0128, 0x011A
_TIFF_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8, 18: 8}
_XMP = b"http://ns.adobe.com/xap/1.0/\x00"


def jpeg_size(head: bytes, more: Callable[[int], bytes]) -> Optional[tuple]:
    """(width, height, orientation or None) of a regular JPEG, else None (ask PIL).

    `head` is the start of the file; `more(n)` returns the file's next bytes
    after those already given (up to n), b'' at its end.
    """
    buf, pos = bytearray(head), 2
    if buf[:3] != b"\xff\xd8\xff":
        return None
    size = exif = None
    xmp = False
    while True:
        if len(buf) < pos + 4:
            buf += more(pos + 4 - len(buf) + 8192)
            if len(buf) < pos + 4:
                return None
        if buf[pos] != 0xFF:
            return None
        marker, length = buf[pos + 1], (buf[pos + 2] << 8) | buf[pos + 3]
        end = pos + 2 + length
        if length < 2 or not (marker in _SOF or marker in _SKIPPED or marker in (_SOS, _DQT)):
            return None
        while len(buf) < end:
            got = more(max(end - len(buf), 8192))
            if not got:
                return None
            buf += got
        s = bytes(buf[pos + 4:end])
        if marker in _SOF:
            if len(s) < 6 or s[0] != 8 or s[5] not in (1, 3, 4):
                return None
            size = ((s[3] << 8) | s[4], (s[1] << 8) | s[2])
        elif marker == _DQT and not _quantization_ok(s):
            return None
        elif marker == _SOS:
            break
        elif 0xE0 <= marker <= 0xEF:
            kind = _app_kind(marker, s)
            if kind is None:
                return None
            if kind == "exif":
                if exif is not None:
                    return None  # PIL joins several; rare enough to leave to it
                exif = s[6:]
            xmp = xmp or kind == "xmp"
        pos = end
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and size[0] * size[1] > Image.MAX_IMAGE_PIXELS:
        return None
    tags = _ifd0(exif) if exif is not None else {}
    if tags is None:
        return None
    orientation = tags.get(_ORIENTATION)
    if orientation is None and xmp:
        return None
    return size[0], size[1], orientation


def _quantization_ok(s: bytes) -> bool:
    """PIL's DQT check: every table complete."""
    pos = 0
    while pos < len(s):
        length = 1 + (64 if s[pos] < 16 else 128)
        if len(s) - pos < length:
            return False
        pos += length
    return True


def _app_kind(marker: int, s: bytes) -> Optional[str]:
    """'exif', 'xmp' or 'other' for an APPn segment PIL reads without trouble; None where it might not."""
    if marker == 0xE0 and s.startswith(b"JFIF"):
        return "other" if len(s) >= 7 else None
    if marker == 0xE1 and s.startswith(b"Exif\0\0"):
        return "exif"
    if marker == 0xE1 and s.startswith(_XMP):
        return "xmp"
    if marker == 0xE2 and s.startswith(b"ICC_PROFILE\0"):
        return "other" if len(s) >= 14 else None
    if marker == 0xE2 and s.startswith(b"MPF\0"):
        return None
    if marker == 0xED and s.startswith(b"Photoshop 3.0\x00"):
        return None
    if marker == 0xEE and s.startswith(b"Adobe"):
        return "other" if len(s) >= 7 else None
    return "other"


def _ifd0(tiff: bytes) -> Optional[dict]:
    """{tag: value} of the Orientation, ResolutionUnit and XResolution of IFD0
    when PIL reads the whole IFD and these entries plainly, else None."""
    if tiff.startswith(b"Exif\0\0") or len(tiff) < 8 or tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    e = "<" if tiff[0] == 0x49 else ">"
    (offset,) = struct.unpack_from(e + "L", tiff, 4)
    if offset + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(e + "H", tiff, offset)
    if offset + 2 + 12 * count + 4 > len(tiff):
        return None
    tags = {}
    for k in range(count):
        tag, typ, n, value = struct.unpack_from(e + "HHL4s", tiff, offset + 2 + 12 * k)
        unit = _TIFF_UNIT.get(typ)
        if unit is None:
            if tag in (_ORIENTATION, _RESOLUTION_UNIT, _X_RESOLUTION) and tag not in tags:
                return None  # PIL skips it and may take a later entry of the tag
            continue
        if n * unit > 4 and struct.unpack(e + "L", value)[0] + n * unit > len(tiff):
            return None  # PIL stops reading the IFD here
        if tag in tags or tag not in (_ORIENTATION, _RESOLUTION_UNIT, _X_RESOLUTION):
            continue  # the first entry of a tag wins, as in PIL
        if tag == _X_RESOLUTION:
            if typ != 5 or n != 1:
                return None
            tags[tag] = "rational"
        elif typ != 3 or n != 1:
            return None
        else:
            tags[tag] = struct.unpack_from(e + "H", value)[0]
    return tags
