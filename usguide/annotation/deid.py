"""De-identification: which header values identify a patient, safe names, and a final check.

An export never copies a DICOM header: images are written as PNG (or a new DICOM built from
nothing but the cropped pixels), and the only names that travel are *source labels*. This module
collects the identifying values of a source (:func:`dicom_identifiers`) so that

- a DICOM source's label is always a stable pseudonym, and any other source's label is one when
  it contains an identifying value (a video called after the patient) (:func:`safe_label`), and
- every file of a finished export is searched for them before it is published
  (:func:`check_files`); a hit stops the export. The annotator's name, typed on purpose, is
  read as a name (:func:`check_name`): it may share one part of a name in the header.

Burned-in text is handled elsewhere: exports are cropped to the imaging region.
Errors and messages name the header *field* that matched, never its value.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from usguide.errors import UsguideError

__all__ = [
    "IDENTIFYING_KEYWORDS",
    "DeidentificationError",
    "check_files",
    "check_name",
    "check_text",
    "dicom_identifiers",
    "safe_label",
]

# Attributes of DICOM PS3.15 Annex E (basic profile) that a B-mode export could leak through a
# file name or a copied header: the patient, the people and the place of the examination.
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "MedicalRecordLocator",
    "IssuerOfPatientID",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    "PatientComments",
    "AdditionalPatientHistory",
    # Instance UIDs link an export back to the examination in the PACS. Exports make fresh ones
    # (dicom_seg builds a new image and SEG from nothing), so no written file holds them.
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
)
# The person names (VR PN) among them: a name typed by a user can share a part with one of these.
_NAME_KEYWORDS = frozenset({
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "RequestingPhysician",
})  # fmt: skip
# JSON fields that hold a person's name typed by the user (see check_name).
_NAME_FIELDS = frozenset({"annotator"})
# Shorter values ("M", "GE", "01") would match innocent text everywhere; they identify nobody.
_MIN_LENGTH = 3
_TEXT_SUFFIXES = frozenset({".json", ".csv", ".txt", ".jsonl"})
_DICOM_SUFFIXES = frozenset({".dcm"})
_PNG_SUFFIXES = frozenset({".png"})


class DeidentificationError(UsguideError):
    """A file about to be published holds a value of the source's identifying header fields."""


def dicom_identifiers(source: str | os.PathLike[str] | Any) -> dict[str, str]:
    """The identifying values of a DICOM file's header, by search string.

    Parameters
    ----------
    source : path or pydicom.Dataset
        The file (read without its pixel data) or a dataset already read.

    Returns
    -------
    dict of str to str
        Search string (upper case) -> the keyword it came from. A person name gives its whole
        value and each component of three characters or more; a date also gives its ISO form
        (``YYYY-MM-DD``). Empty when the file is not DICOM or holds none.

    Notes
    -----
    Callers keep the result in memory only; it must never be written or printed.
    """
    import pydicom
    from pydicom.multival import MultiValue

    if isinstance(source, str | os.PathLike):
        try:
            ds = pydicom.dcmread(source, stop_before_pixels=True)
        except (pydicom.errors.InvalidDicomError, OSError):
            return {}
    else:
        ds = source
    found: dict[str, str] = {}
    for keyword in IDENTIFYING_KEYWORDS:
        value = ds.get(keyword)
        if value is None:
            continue
        values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
        for item in values:
            for text in _forms(str(item)):
                found.setdefault(text.upper(), keyword)
    return found


def _forms(value: str) -> list[str]:
    """A value and the pieces of it that identify on their own (name parts, ISO dates)."""
    value = value.strip()
    forms = [value]
    if "^" in value or "=" in value:
        parts = [p.strip() for p in re.split(r"[\^=]", value)]
        forms += parts
        forms.append(" ".join(p for p in parts if p))
    if re.fullmatch(r"\d{8}", value):
        forms.append(f"{value[:4]}-{value[4:6]}-{value[6:]}")
    return [f for f in forms if len(f) >= _MIN_LENGTH]


def check_text(text: str, identifiers: Mapping[str, str]) -> str | None:
    """The keyword of the first identifying value found in ``text``, or None.

    Matching ignores case and wants the value as a whole token (not inside a longer word or
    number), so a name part "Ann" does not match "annotation" but does match "ann_scan".
    """
    upper = text.upper()
    for value, keyword in identifiers.items():
        if _found(value, upper):
            return keyword
    return None


def check_name(name: str, identifiers: Mapping[str, str]) -> str | None:
    """The keyword of an identifying value in a person's name typed by the user (the
    annotator), or None.

    As :func:`check_text`, except that one word of a name in the header (a given or family
    name, or a word of one: "SMITH-JONES", "ANNA MARIA") may stand beside another word of three
    letters or more: an annotator "Anna Berg" is not the patient "SMITH^ANNA". A whole name,
    two words of one name in any order, every word of one name (or of one of its ideographic or
    phonetic groups) however short, a word alone or with only an initial or a title ("A.
    Smith"), and any other identifying value are hits. Both sides are compared in Unicode
    normal form NFKC (decomposed and full-width letters are the same name).
    """
    upper = _norm(name)
    wholes: dict[str, str] = {}  # a header person name -> its keyword
    owners: dict[str, set[str]] = {}  # a word of three letters or more -> the names it is in
    for value, keyword in identifiers.items():
        value = _norm(value)
        if keyword in _NAME_KEYWORDS and _NAME_SEPARATORS.search(value):
            wholes.setdefault(value, keyword)
            for word in _name_words(value):
                if len(word) >= _MIN_LENGTH:
                    owners.setdefault(word, set()).add(value)
    for value, keyword in identifiers.items():
        value = _norm(value)
        if keyword in _NAME_KEYWORDS and (
            value in owners or value in wholes or _TITLES.fullmatch(value)
        ):
            continue  # read word by word below (a title, "MRS", identifies nobody)
        if _found(value, upper):
            return keyword  # a whole name, an ID, a date ...
    found: dict[str, list[str]] = {}  # a header name -> its words found
    for word, names in owners.items():
        if _found(word, upper):
            for whole in names:
                found.setdefault(whole, []).append(word)
    for whole, parts in found.items():
        rest = upper
        for part in parts:
            rest = _token(part).sub(" ", rest)
        rest = _TITLES.sub(" ", rest)  # "Mrs Smith" is the patient Smith, not another person
        # Another word must remain, or the typed name is nothing but this person's name.
        if len(parts) > 1 or not re.search(rf"[^\W\d_]{{{_MIN_LENGTH},}}", rest):
            return wholes[whole]
    for whole, keyword in wholes.items():
        # Every word of one group, however short ("WU^LI", ideographic "山田^太郎").
        for group in whole.split("="):
            words = set(_name_words(group))
            if len(words) > 1 and all(_found(w, upper) for w in words):
                return keyword
    return None


# What separates the words of a DICOM person name: components, groups, spaces, hyphens.
_NAME_SEPARATORS = re.compile(r"[\^=\s,.\-]+")
_TITLES = re.compile(
    r"(?<![A-Z0-9])(MR|MRS|MS|MISS|MX|DR|PROF|PROFESSOR|DOCTOR|SIR|MADAM|MME|MLLE|HERR|FRAU"
    r"|MISTER|MISSUS|MADAME|MADEMOISELLE|MONSIEUR|DOKTOR|DOTT|DOTTORE|DOTTORESSA|DRA|SRA|SRTA"
    r"|SENOR|SEÑOR|SENORA|SEÑORA|SENHOR|SENHORA|SIGNOR|SIGNORA|REV|PHD|JNR|SNR|JUNIOR|SENIOR)"
    r"(?![A-Z0-9])"
)


def _norm(text: str) -> str:
    """``text`` as names are compared: NFKC, upper case."""
    return unicodedata.normalize("NFKC", text).upper()


def _name_words(name: str) -> list[str]:
    """The words of a person name (titles left out)."""
    return [w for w in _NAME_SEPARATORS.split(name) if w and not _TITLES.fullmatch(w)]


def _token(value: str) -> re.Pattern[str]:
    """``value`` as a whole token: not inside a longer word or number."""
    return re.compile(rf"(?<![A-Z0-9]){re.escape(value)}(?![A-Z0-9])")


def _found(value: str, upper: str) -> bool:
    return value in upper and _token(value).search(upper) is not None


def safe_label(
    name: str, identifiers: Mapping[str, str] | None = None, *, dicom: bool = False
) -> str:
    """A short label for a source that is safe to write: no path, no identifier.

    Parameters
    ----------
    name : str
        The source as usguide names it (a path, ``device:0`` ...).
    identifiers : mapping, optional
        Identifying values of that source (:func:`dicom_identifiers`).
    dicom : bool
        The source is read as DICOM: its label is always the pseudonym. Scanner and PACS file
        names carry UIDs, dates and IDs in forms no search recognises, and nothing a researcher
        needs.

    Returns
    -------
    str
        The file's stem reduced to ``[A-Za-z0-9_-]`` (folders never travel: they often carry a
        patient's name); ``source-<10 hex>``, a pseudonym stable for ``name``, for a DICOM
        source, or when the stem holds an identifying value or nothing is left of it.
    """
    stem = Path(str(name).replace("\\", "/")).stem if name else ""
    label = re.sub(r"[^A-Za-z0-9_-]+", "-", stem).strip("-")[:64]
    if dicom or not label or (identifiers and check_text(stem, identifiers)):
        digest = hashlib.sha256(str(name).encode("utf-8", "surrogatepass")).hexdigest()[:10]
        return f"source-{digest}"
    return label


def check_files(paths: Iterable[str | os.PathLike[str]], identifiers: Mapping[str, str]) -> None:
    """Search files about to be published for identifying values; raise on the first found.

    JSON files are searched in their string values (keys are the format's own words, and
    numbers - sizes, boxes, RLE counts - would match numeric IDs by chance), an ``annotator``
    value as a name (:func:`check_name`: the annotator may share a given name with the
    patient, never be the patient); other text files
    (CSV, TXT, JSONL) whole; DICOM files element by element (every string value, in every
    sequence); PNG files in their text chunks (pixels carry no text bytes; burned-in text is
    removed by cropping). Other files are not searched.

    Raises
    ------
    DeidentificationError
        Naming the file and the header field, never the value.
    """
    if not identifiers:
        return
    for path in map(Path, paths):
        suffix = path.suffix.lower()
        keyword = field = None
        if suffix in _TEXT_SUFFIXES:
            text = path.read_text(encoding="utf-8", errors="replace")
            names: list[tuple[str | None, str]] = []
            if suffix == ".json":
                with contextlib.suppress(ValueError):  # not JSON after all: searched whole
                    values = list(_strings(json.loads(text)))
                    text = "\n".join(v for k, v in values if k not in _NAME_FIELDS)
                    names = [(k, v) for k, v in values if k in _NAME_FIELDS]
            keyword = check_text(text, identifiers)
            for key, name in names if keyword is None else ():
                if (keyword := check_name(name, identifiers)) is not None:
                    field = key
                    break
        elif suffix in _DICOM_SUFFIXES:
            keyword = _check_dicom(path, identifiers)
        elif suffix in _PNG_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                keyword = check_text(json.dumps(im.info, default=str), identifiers)
        if field is not None:
            hint = (
                " (an annotator may share one part of a name in the header, never be that name, "
                "two parts of it or a part alone: type the annotator's own full name)"
                if keyword in _NAME_KEYWORDS
                else ""
            )
            raise DeidentificationError(
                path, f"its {field} field holds the source's {keyword}{hint}; export stopped"
            )
        if keyword is not None:
            raise DeidentificationError(
                path, f"holds a value of the source's {keyword}; export stopped"
            )


def _strings(obj: Any, key: str | None = None) -> Iterator[tuple[str | None, str]]:
    """The string values of a parsed JSON document, at any depth (not its keys or numbers),
    each with the key it stands under (None at the top)."""
    if isinstance(obj, str):
        yield key, obj
    elif isinstance(obj, dict):
        for k, value in obj.items():
            yield from _strings(value, k)
    elif isinstance(obj, list):
        for item in obj:
            yield from _strings(item, key)


def _check_dicom(path: Path, identifiers: Mapping[str, str]) -> str | None:
    import pydicom

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    texts: list[str] = []

    def visit(dataset: Any) -> None:
        for element in dataset:
            if element.VR == "SQ":
                for item in element.value:
                    visit(item)
            elif element.VR not in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
                texts.append(str(element.value))

    visit(ds.file_meta)
    visit(ds)
    return check_text("\n".join(texts), identifiers)
