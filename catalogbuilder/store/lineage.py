"""Lineage of ingested files: which file is the current reduction of its product, which are superseded or retired.

Rules (docs/store.md, "Lineage"):

* **Same path, new content.** Ingesting a file at a path whose active file has other bytes supersedes that file
  (``replaced at its path``): the path now holds the new bytes. This holds even when the new bytes are rejected.
* **Newer reduction of the same product.** Files with the same non-empty ``product_key`` (the observation or star
  product the reader names: apStar OBJID+FIELD, apVisit plate-mjd-fiber, BOSS plate-mjd-fiber or field-mjd-catalogid,
  LAMOST obsid) are reductions of one product; only the latest stays active. Latest = the higher reduction version
  when both files state one (numbers compared in order: v5_13_2 < v6_1_3, DR7 < DR8), else the later header creation
  date when both state one, else the later ingest.
* **Retired.** ``store retire`` (or an ingest with ``sync``) withdraws files; their spectra leave the release.
* Re-giving the bytes of a superseded or retired file at its own path offers it again: it becomes active if it is
  the latest reduction of its product.

Superseded and retired files keep their spectra in the store (and in every earlier snapshot); only their ``active``
flag changes, so inference skips them and the release leaves them out.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

from catalogbuilder.store.layout import FILE_ACTIVE, FILE_RETIRED, FILE_SUPERSEDED

REASON_REPLACED = "replaced at its path by {sha}"
REASON_NEWER = "superseded by the newer reduction {path}"
REASON_RETIRED = "retired: {why}"


def version_key(reduction: str) -> tuple[int, ...]:
    """The numbers of a reduction version in order (``v5_13_2`` → (5, 13, 2), ``LAMOST DR7 v2.9.7`` → (7, 2, 9, 7));
    empty when it states none."""
    return tuple(int(number) for number in re.findall(r"\d+", reduction))


@dataclasses.dataclass
class FileRecord:
    """One file of the ledger (``index`` ≥ 0) or of this ingest (``index`` = -1 until it is appended).

    ``sequence`` orders ingests (ledger row, then input order of this run): the later one is the newer file when
    the headers say nothing about the reduction.
    """

    path: str
    sha256: str
    product_key: str
    reduction: str
    reduction_date: str
    sequence: int
    status: int
    index: int = -1
    offered: bool = False  # given in this run (new, or known bytes at their own path)
    reason: str = ""


def _later(a: FileRecord, b: FileRecord) -> bool:
    """True when ``a`` is a later reduction than ``b``: versions decide when both state one and differ, then dates
    when both state one and differ, then the ingest order."""
    va, vb = version_key(a.reduction), version_key(b.reduction)
    if va and vb and va != vb:
        return va > vb
    if a.reduction_date and b.reduction_date and a.reduction_date != b.reduction_date:
        return a.reduction_date > b.reduction_date
    return a.sequence > b.sequence


def replace_paths(active_at_path: Sequence[FileRecord], given_sha: str) -> list[FileRecord]:
    """Active files at a path given again with other bytes: each becomes superseded (returned, changed in place)."""
    replaced = []
    for record in active_at_path:
        if record.status == FILE_ACTIVE and record.sha256 != given_sha:
            record.status, record.reason = FILE_SUPERSEDED, REASON_REPLACED.format(sha=given_sha[:16])
            replaced.append(record)
    return replaced


def resolve_product(members: Sequence[FileRecord]) -> list[FileRecord]:
    """Keep only the latest reduction of one product active among its active and offered members; returns the
    records whose status changed (changed in place). Files that are neither active nor offered are not considered."""
    candidates = [m for m in members if m.status == FILE_ACTIVE or m.offered]
    if not candidates:
        return []
    winner = candidates[0]
    for candidate in candidates[1:]:
        if _later(candidate, winner):
            winner = candidate
    changed = []
    for member in candidates:
        status, reason = (FILE_ACTIVE, "") if member is winner else (
            FILE_SUPERSEDED, REASON_NEWER.format(path=winner.path))
        if (member.status, member.reason) != (status, reason) or member.index < 0:
            member.status, member.reason = status, reason
            changed.append(member)
    return changed


def retire(records: Sequence[FileRecord], why: str) -> list[FileRecord]:
    """Retire every file among ``records`` not retired yet; returns those changed (in place)."""
    changed = []
    for record in records:
        if record.status != FILE_RETIRED:
            record.status, record.reason = FILE_RETIRED, REASON_RETIRED.format(why=why)
            changed.append(record)
    return changed
