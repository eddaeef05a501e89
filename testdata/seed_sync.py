"""The seed job's pattern for BenchmarkSync: SQLAlchemy ORM, a commit every 25 rows.

The seed job (Python, SQLAlchemy ORM) syncs a product catalogue row by row in a
session made with expire_on_commit=False, looking each product up by its key,
updating its attributes or adding a new object, and committing every
COMMIT_INTERVAL = 25 products (its "keep-alive commits"). This script does that
for a sample of the benchmark's source rows (the CSV file written for the psql
\\copy baseline) against the products table at version 1, and prints the rows/s
it measured, Python start-up, imports, reading the CSV and connecting excluded:

    /usr/bin/python3 testdata/seed_sync.py DSN SCHEMA CSV LIMIT [STRIDE [cached]]

DSN is a libpq connection string or postgres:// URL, handed to psycopg2 (libpq)
as is ("" = libpq defaults); SCHEMA holds the products table; LIMIT source rows
are synced, every STRIDE-th data row of the CSV (default 1: the first LIMIT rows).
With "cached", the job first loads every product of the table into a dict by sku
(the report's "existing_skus_cache" taken to hold the product objects, which
expire_on_commit=False keeps usable across commits) and then looks rows up there:
an unchanged row then costs no SQL at all. That load is timed apart
(preload_seconds): it is paid once per run, the loop per source row.
Output: one line "rows=<n> seconds=<s> rows/s=<r> updated=<u> inserted=<i>
preload_seconds=<p> preloaded=<k>".
It needs SQLAlchemy 1.4+ and psycopg2: apt-get install -y python3-sqlalchemy
python3-psycopg2.
"""

import csv
import datetime
import decimal
import sys
import time

import psycopg2
import sqlalchemy as sa
from sqlalchemy.orm import declarative_base, sessionmaker

COMMIT_INTERVAL = 25

Base = declarative_base()


class Product(Base):
    """The benchmark's products table (internal/workload.CreateTableSQL)."""

    __tablename__ = "products"
    id = sa.Column(sa.BigInteger, primary_key=True)
    sku = sa.Column(sa.Text, unique=True, nullable=False)
    name = sa.Column(sa.Text, nullable=False)
    price = sa.Column(sa.Numeric(12, 2), nullable=False)
    inventory = sa.Column(sa.Integer, nullable=False)
    updated_at = sa.Column(sa.DateTime(timezone=True), nullable=False)


def read_source(path, limit, stride):
    """Every stride-th record of the CSV, at most limit, as typed dicts."""
    out = []
    with open(path, newline="") as f:
        r = csv.DictReader(f)
        for k, rec in enumerate(r):
            if k % stride:
                continue
            out.append({
                "sku": rec["sku"],
                "name": rec["name"],
                "price": decimal.Decimal(rec["price"]),
                "inventory": int(rec["inventory"]),
                "updated_at": datetime.datetime.fromisoformat(rec["updated_at"].replace("Z", "+00:00")),
            })
            if len(out) >= limit:
                break
    return out


def main(argv):
    if len(argv) not in (5, 6, 7) or len(argv) == 7 and argv[6] != "cached":
        sys.exit(__doc__)
    dsn, schema, path, limit = argv[1], argv[2], argv[3], int(argv[4])
    stride = int(argv[5]) if len(argv) >= 6 else 1
    cached = len(argv) == 7
    source = read_source(path, limit, stride)

    # The DSN goes to psycopg2 (libpq) untouched: libpq parses postgres:// URLs and
    # their sslmode itself, and "" means its defaults. The seed's pool settings:
    # pool_recycle 300 s and TCP keepalives (it passes them to asyncpg).
    engine = sa.create_engine(
        "postgresql+psycopg2://",
        creator=lambda: psycopg2.connect(
            dsn, keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=5),
        pool_recycle=300,
        execution_options={"schema_translate_map": {None: schema}},
    )
    # Connect before the clock starts (the pool keeps the connection).
    with engine.connect() as conn:
        conn.exec_driver_sql("SELECT 1")

    # The seed's session: batch_session = sessionmanager._sessionmaker(expire_on_commit=False)
    batch_session = sessionmaker(bind=engine, expire_on_commit=False)()
    updated = inserted = 0
    pending_ids = []
    cache = None
    preload_seconds, preloaded = 0.0, 0
    if cached:
        t0 = time.perf_counter()
        cache = {p.sku: p for p in batch_session.query(Product)}
        batch_session.commit()
        preload_seconds, preloaded = time.perf_counter() - t0, len(cache)
    t0 = time.perf_counter()
    for row in source:
        if cache is None:
            product = batch_session.query(Product).filter_by(sku=row["sku"]).first()
        else:
            product = cache.get(row["sku"])
        if product is None:
            product = Product(**row)
            batch_session.add(product)
            if cache is not None:
                cache[row["sku"]] = product
            inserted += 1
        else:
            if (product.name, product.price, product.inventory, product.updated_at) != (
                    row["name"], row["price"], row["inventory"], row["updated_at"]):
                updated += 1
            product.name = row["name"]
            product.price = row["price"]
            product.inventory = row["inventory"]
            product.updated_at = row["updated_at"]
        pending_ids.append(row["sku"])
        if len(pending_ids) >= COMMIT_INTERVAL:
            batch_session.commit()
            pending_ids.clear()
    if pending_ids:
        batch_session.commit()
    seconds = time.perf_counter() - t0
    batch_session.close()
    engine.dispose()
    print("rows=%d seconds=%.6f rows/s=%.3f updated=%d inserted=%d preload_seconds=%.6f preloaded=%d"
          % (len(source), seconds, len(source) / seconds, updated, inserted, preload_seconds, preloaded))


if __name__ == "__main__":
    main(sys.argv)
