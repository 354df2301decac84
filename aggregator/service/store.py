"""The service's state in SQL (sqlite by default, Postgres in compose) through SQLAlchemy.

Message *bytes* live in the federation workspace (``aggregator.protocol.workspace``); these tables hold
who was asked what, by when, and what became of it: received, rejected (and why), expired.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text, create_engine, event, inspect, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

# A task's life: pending -> fetched -> done | failed (the bank said why) | expired (its phase closed)
OPEN_TASK_STATES = ("pending", "fetched")
# A round's life: training -> evaluating -> registered, or failed at any point (then opened again: its next attempt)
ROUND_STATES = ("training", "evaluating", "registered", "failed")


class Base(DeclarativeBase):
    pass


class Participant(Base):
    __tablename__ = "participants"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))
    last_seen: Mapped[float | None] = mapped_column(Float, nullable=True)


class Federation(Base):
    __tablename__ = "federations"
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    model_name: Mapped[str] = mapped_column(String(128))
    request: Mapped[dict[str, Any]] = mapped_column(JSON)  # strategy, rounds, seed, settings, banks
    # preparing | counting | cross-evaluating | planned | failed
    state: Mapped[str] = mapped_column(String(16), default="preparing")
    plan: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class Round(Base):
    __tablename__ = "rounds"
    federation: Mapped[str] = mapped_column(ForeignKey("federations.key"), primary_key=True)
    round_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[str] = mapped_column(String(16), default="training")
    collective: Mapped[bool] = mapped_column(default=False)  # trained in one call (cyclic, histogram)
    deadline: Mapped[float] = mapped_column(Float)  # of the current phase
    version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # the one running or last run
    banks: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)  # this attempt's; None: the plan's
    earlier: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)  # failed attempts, in order


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    federation: Mapped[str] = mapped_column(ForeignKey("federations.key"), index=True)
    round_id: Mapped[int] = mapped_column(Integer)  # 0: the federation's preparation (summaries)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # of its round
    kind: Mapped[str] = mapped_column(String(32))
    bank: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    input_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    result_path: Mapped[str] = mapped_column(Text)
    deadline: Mapped[float] = mapped_column(Float)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    detail: Mapped[str | None] = mapped_column(Text, nullable=True)  # why it failed or expired
    result_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)


class Rejection(Base):
    """Every refused upload, named: which bank, which task, which check, why."""

    __tablename__ = "rejections"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[float] = mapped_column(Float, default=time.time)
    caller: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    federation: Mapped[str | None] = mapped_column(String(128), nullable=True)
    round_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    attempt: Mapped[int] = mapped_column(Integer, default=1, server_default="1")  # of its round
    check: Mapped[str] = mapped_column(String(32))  # too_large, malformed, wrong_sender, late, duplicate, ...
    detail: Mapped[str] = mapped_column(Text)


def open_database(url: str):
    """An engine and session factory with the tables created (sqlite: WAL, safe across threads)."""
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection, _record):
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            dbapi_connection.execute("PRAGMA foreign_keys=ON")
    else:
        engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)
    add_missing_columns(engine)
    return engine, sessionmaker(engine, expire_on_commit=False)


def add_missing_columns(engine) -> list[str]:
    """A database an earlier version created lacks the columns added since (each nullable or with a server
    default): add them, so an upgraded service keeps its federations. Returns the columns added."""
    added = []
    tables = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in tables.get_columns(table.name)}
            for column in table.columns:
                if column.name not in present:
                    default = f" DEFAULT {column.server_default.arg}" if column.server_default is not None else ""
                    connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} "
                                            f"{column.type.compile(engine.dialect)}{default}"))
                    added.append(f"{table.name}.{column.name}")
    return added
