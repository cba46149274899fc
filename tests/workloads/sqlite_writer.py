#!/usr/bin/env python3
"""A database that commits durably and never stops: the consistency tests'
workload.

    sqlite_writer.py DB PROGRESS [--second DB2] [--payload BYTES] [--latency FILE]

Each transaction inserts row n (n = 1, 2, ...) with a random payload into
table t of DB, and with --second also into table t of DB2, attached, in the
same transaction: SQLite then commits through a super-journal, atomically
across both files, which may live on different disks. Every commit is
durable (synchronous = FULL, rollback journal: fsync of journal and
database). After each commit the committed count is written to PROGRESS, so
a test knows what a point taken before and after must contain. With
--latency, each commit's wall time is appended to FILE as "unix_time ms".
"""
import argparse
import os
import sqlite3
import sys
import time


def main():
    p = argparse.ArgumentParser()
    p.add_argument("db")
    p.add_argument("progress")
    p.add_argument("--second")
    p.add_argument("--payload", type=int, default=12288)
    p.add_argument("--latency")
    a = p.parse_args()

    con = sqlite3.connect(a.db, isolation_level=None)
    con.execute("PRAGMA journal_mode = DELETE")
    con.execute("PRAGMA synchronous = FULL")
    schemas = ["main"]
    if a.second:
        con.execute("ATTACH DATABASE ? AS second", (a.second,))
        con.execute("PRAGMA second.journal_mode = DELETE")
        con.execute("PRAGMA second.synchronous = FULL")
        schemas.append("second")
    for s in schemas:
        con.execute(f"CREATE TABLE IF NOT EXISTS {s}.t (id INTEGER PRIMARY KEY, payload BLOB)")
    n = con.execute("SELECT coalesce(max(id), 0) FROM main.t").fetchone()[0]
    fd = os.open(a.progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    lat = open(a.latency, "a", buffering=1) if a.latency else None
    while True:
        n += 1
        payload = os.urandom(a.payload)
        t0 = time.perf_counter()
        con.execute("BEGIN IMMEDIATE")
        for s in schemas:
            con.execute(f"INSERT INTO {s}.t (id, payload) VALUES (?, ?)", (n, payload))
        # Rewrite an older row too, so pages all over the file change.
        if n > 10:
            for s in schemas:
                con.execute(f"UPDATE {s}.t SET payload = ? WHERE id = ?", (payload[:512], n // 2))
        con.execute("COMMIT")
        if lat:
            lat.write(f"{time.time():.6f} {(time.perf_counter() - t0) * 1000:.3f}\n")
        text = f"{n}\n".encode()
        os.pwrite(fd, text.ljust(24), 0)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(0)
