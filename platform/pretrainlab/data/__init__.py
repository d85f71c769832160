"""Datasets: source formats converted once to Parquet shards, read back with Ray Data.

``shards`` owns the on-disk format (schema, shard writer, manifest, verification),
``builtin`` converts the installable real datasets, ``dataset`` reads and decodes them.
"""
