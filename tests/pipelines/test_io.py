"""Output helpers: footer row counts of what Spark wrote."""

from __future__ import annotations

from pipelines.io import parquet_rows, write_parquet


def test_parquet_rows_counts_every_part_file_and_an_empty_write(spark, tmp_path):
    df = spark.range(1000).repartition(3)
    write_parquet(df, tmp_path / "some")
    write_parquet(df.limit(0), tmp_path / "none")
    assert len(list((tmp_path / "some").glob("part-*.parquet"))) == 3
    assert parquet_rows(tmp_path / "some") == 1000 == spark.read.parquet(str(tmp_path / "some")).count()
    assert parquet_rows(tmp_path / "none") == 0 and spark.read.parquet(str(tmp_path / "none")).columns == ["id"]
