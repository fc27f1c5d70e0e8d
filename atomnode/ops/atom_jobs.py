"""Mark AtoM's own job record failed when atomnode gives a job up (opt-in).

AtoM's web app creates a row in its ``job`` table with status "in progress" before it
submits a job, and passes that row's id in the job's JSON payload (``"id"``); the worker
sets "completed" or "error" itself. When the worker dies on the job's last attempt,
atomnode gives the job up and nobody updates the row: the Jobs page says "Running"
forever. With ``mark_failed_jobs: true`` on a site in ``atom_sites:``, atomnode then sets
the row to "error" and adds an error note with its reason, as AtoM's
``QubitJob::setStatusError()`` does.

Facts from AtoM's schema (config/schema.yml) and QubitTerm, the same in every 2.2+
release: ``job(id, status_id, completed_at, ...)``; ``note(id, object_id, type_id,
source_culture, serial_number, ...)``; ``note_i18n(content, id, culture)``; status terms
183 (in progress) and 185 (error); note type 197 (job error note). The table shape is
checked before the first update; a site whose tables differ is left alone (logged once).

Failure policy: everything here runs in a worker thread (never on a worker's or client's
path), never raises into the daemon, and logs what it could not do. Only a row still "in
progress" is changed, so a record the worker already finished is never overwritten.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ..system.names import atom_job_id  # noqa: F401 (re-exported: the daemon, tests)

log = logging.getLogger("atomnode.atom")

JOB_STATUS_IN_PROGRESS_ID = 183
JOB_STATUS_ERROR_ID = 185
JOB_ERROR_NOTE_ID = 197
#: Columns atomnode writes or relies on, per table.
REQUIRED_COLUMNS = {
    "job": {"id", "status_id", "completed_at"},
    "note": {"id", "object_id", "type_id", "source_culture"},
    "note_i18n": {"id", "content", "culture"},
}


def check_job_tables(con: Any) -> str | None:
    """None if AtoM's job and note tables have the expected columns, else why not."""
    with con.cursor() as cur:
        cur.execute(
            "SELECT TABLE_NAME, COLUMN_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME IN ('job', 'note', 'note_i18n')"
        )
        have: dict[str, set[str]] = {}
        for table, column in cur.fetchall():
            have.setdefault(str(table).lower(), set()).add(str(column).lower())
    for table, cols in REQUIRED_COLUMNS.items():
        if table not in have:
            return f"there is no table {table!r}"
        lacking = sorted(cols - have[table])
        if lacking:
            return f"table {table!r} has no column(s) {', '.join(lacking)}"
    return None


@dataclass
class SiteMarker:
    """Marks failed jobs of one AtoM site (credentials read from its config when used)."""

    root: str
    prefix: str | None
    checked: bool = False
    disabled: str | None = None  # why this site is left alone
    marked: list[int] = field(default_factory=list)  # AtoM job ids marked (for status/tests)

    def owns(self, function: str) -> bool:
        if self.prefix is None:
            return True
        return function.startswith(self.prefix)

    def mark_failed(self, job_id: int, reason: str, timeout: float = 5.0) -> bool:
        """Set AtoM job ``job_id`` to "error" with ``reason`` as its error note, if it is
        still "in progress". Blocking (call it in a thread). Never raises."""
        if self.disabled:
            return False
        from .atom_site import MysqlUnavailable, _connect, read_database

        notes: list[str] = []
        db = read_database(os.path.realpath(self.root), notes)
        if db is None:
            log.warning(
                "AtoM site %s: cannot mark job %d failed: %s",
                self.root,
                job_id,
                "; ".join(notes) or "no database settings",
            )
            return False
        try:
            con = _connect(db, timeout)
        except MysqlUnavailable as e:
            log.warning("AtoM site %s: cannot mark job %d failed: %s", self.root, job_id, e)
            return False
        try:
            if not self.checked:
                why = check_job_tables(con)
                self.checked = True
                if why:
                    self.disabled = why
                    log.warning(
                        "AtoM site %s: not marking failed jobs in AtoM's database: %s "
                        "(not the job table of AtoM 2.2 or later)",
                        self.root,
                        why,
                    )
                    return False
            con.begin()
            with con.cursor() as cur:
                n = cur.execute(
                    "UPDATE job SET status_id = %s, completed_at = NOW() "
                    "WHERE id = %s AND status_id = %s",
                    (JOB_STATUS_ERROR_ID, job_id, JOB_STATUS_IN_PROGRESS_ID),
                )
                if n == 1:
                    cur.execute(
                        "INSERT INTO note (object_id, type_id, source_culture) "
                        "VALUES (%s, %s, 'en')",
                        (job_id, JOB_ERROR_NOTE_ID),
                    )
                    cur.execute(
                        "INSERT INTO note_i18n (content, id, culture) VALUES (%s, %s, 'en')",
                        (f"atomnode: {reason}", cur.lastrowid),
                    )
            con.commit()
        except Exception as e:  # a failure here must never reach the daemon
            try:
                con.rollback()
            except Exception:
                pass
            log.warning("AtoM site %s: cannot mark job %d failed: %s", self.root, job_id, e)
            return False
        finally:
            con.close()
        if n == 1:
            self.marked.append(job_id)
            log.info("AtoM site %s: job %d marked failed in AtoM (%s)", self.root, job_id, reason)
            return True
        log.info(
            "AtoM site %s: job %d is not in progress in AtoM; left as it is", self.root, job_id
        )
        return False
