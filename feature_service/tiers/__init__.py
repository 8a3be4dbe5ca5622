"""The storage tiers behind the feature service: memory (L1), Redis (L2), and the durable tier of record
(Cassandra, or the embedded SQLite file). Import the module you need: each pulls in its own client library."""
