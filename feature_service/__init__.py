"""Fresco's feature service: batch feature fetching through memory → Redis → Cassandra (or an
embedded SQLite file), streaming pushes, materialisation, and one null policy for training and serving."""
