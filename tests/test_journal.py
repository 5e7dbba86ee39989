"""The request journal (broker/journal.py): what a restarted broker finds."""

from __future__ import annotations

import os
import stat

import pytest

from broker.journal import Entry, Journal, JournalError


def _entry(i: int, **kw) -> Entry:
    fields = dict(request_id=f"r{i}", client=b"\x00client-a", workflow="wf", params={"prompt": f"p{i}", "seed": i},
                  tensors=[({"name": "image", "dtype": "uint8", "shape": [2, 2, 3]}, bytes(range(12)))],
                  progress=True, accepted_at=1000.0 + i)
    fields.update(kw)
    return Entry(**fields)


def test_unfinished_requests_survive_a_reopen_in_acceptance_order_with_their_inputs(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    for i in range(5):
        journal.accepted(_entry(i))
    journal.ended("r1", "finished")
    journal.ended("r3", "cancelled")
    journal.close()  # as a killed broker would leave it
    again = Journal(tmp_path / "journal.db")
    assert [e.request_id for e in again.unfinished()] == ["r0", "r2", "r4"]
    assert again.unfinished()[1] == _entry(2)
    assert again.status("r1") == "finished" and again.status("nope") is None
    assert stat.S_IMODE(os.stat(tmp_path / "journal.db").st_mode) == 0o600


def test_a_request_is_journaled_once_and_ends_once(tmp_path):
    journal = Journal(tmp_path / "journal.db")
    journal.accepted(_entry(1))
    with pytest.raises(ValueError, match="request_id"):
        journal.accepted(_entry(1))
    journal.ended("r1", "failed")
    journal.ended("r1", "finished")  # a late second answer does not rewrite the first
    assert journal.status("r1") == "failed"
    with pytest.raises(ValueError, match="status"):
        journal.ended("r1", "lost")


def test_ended_entries_are_pruned_after_the_retention_and_open_ones_never(tmp_path):
    journal = Journal(tmp_path / "journal.db", retention_s=60)
    for i in range(3):
        journal.accepted(_entry(i))
    journal.ended("r0", "finished", now=100.0)
    journal.ended("r1", "finished", now=150.0)
    assert journal.prune(now=200.0) == 1  # r0 ended 100 s ago, r1 50 s ago
    assert journal.status("r0") is None and journal.status("r1") == "finished"
    assert [e.request_id for e in journal.unfinished()] == ["r2"]


def test_a_corrupt_journal_stops_the_broker_naming_the_file(tmp_path):
    path = tmp_path / "journal.db"
    path.write_bytes(b"this is not a database" * 100)
    with pytest.raises(JournalError, match=str(path)):
        Journal(path)


def test_the_submitting_key_is_journaled_and_an_older_journal_gains_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "journal.db"
    old = sqlite3.connect(path)  # a journal written before keys were journaled: no `user` column
    old.executescript("CREATE TABLE requests (seq INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL UNIQUE, "
                      "client BLOB NOT NULL, workflow TEXT NOT NULL, params BLOB NOT NULL, tensors BLOB NOT NULL, "
                      "progress INTEGER NOT NULL, accepted_at REAL NOT NULL, status TEXT NOT NULL DEFAULT 'accepted', "
                      "ended_at REAL)")
    old.execute("INSERT INTO requests (request_id, client, workflow, params, tensors, progress, accepted_at) "
                "VALUES ('r0', x'00', 'wf', x'80', x'90', 1, 1000.0)")
    old.commit()
    old.close()
    journal = Journal(path)
    (before,) = journal.unfinished()
    assert before.request_id == "r0" and before.user == ""
    journal.accepted(_entry(1, user="client:web-app"))
    journal.close()
    assert [e.user for e in Journal(path).unfinished()] == ["", "client:web-app"]
