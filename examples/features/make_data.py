"""Write example offline data for examples/features/definitions.yaml: user_profile.parquet and
user_activity.csv, with a few nulls and a few invalid rows so materialisation has something to report.

    python examples/features/make_data.py [OUT_DIR] [--users N]
    fresco features materialize --definitions examples/features/definitions.yaml \
        --view user_profile --source OUT_DIR/user_profile.parquet
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.csv as pa_csv  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

PLANS = ["free", "pro", "enterprise"]
COUNTRIES = ["FR", "DE", "US", "BR", "JP", None]
CATEGORIES = ["books", "games", "garden", "music", None]


def user_profile(users: int, rng: np.random.Generator, now: float) -> pa.Table:
    """One row per user and a second, older row for some (materialisation keeps the latest)."""
    ids = np.concatenate([np.arange(users), rng.choice(users, users // 5, replace=False)])
    n = len(ids)
    tenure = rng.integers(0, 3000, n).tolist()
    for i in rng.choice(n, n // 20, replace=False):
        tenure[i] = None  # median-imputed when served
    tenure[0] = -5  # out of range: rejected
    plans = [PLANS[k] for k in rng.choice(3, n, p=[0.6, 0.3, 0.1])]
    plans[1] = "platinum"  # not a category: rejected
    ages = np.where(np.arange(n) < users, 0, 86_400 * 30)  # the duplicate rows are a month older
    return pa.table(
        {
            "user_id": pa.array(ids, pa.int64()),
            "tenure_days": pa.array(tenure, pa.int64()),
            "plan": plans,
            "country": [COUNTRIES[k] for k in rng.integers(0, len(COUNTRIES), n)],
            "verified": rng.random(n) < 0.7,
            "event_timestamp": pa.array(
                ((now - ages - rng.integers(0, 3600, n)) * 1e6).astype("int64"), pa.timestamp("us", "UTC")
            ),
        }
    )


def user_activity(users: int, rng: np.random.Generator, now: float) -> pa.Table:
    """Activity counters with a JSON embedding column, as a CSV file would hold them."""
    spend = np.round(rng.gamma(2.0, 40.0, users), 2).tolist()
    for i in rng.choice(users, users // 10, replace=False):
        spend[i] = None
    return pa.table(
        {
            "user_id": np.arange(users),
            "spend_30d": pa.array(spend, pa.float64()),
            "visits_7d": rng.poisson(3, users),
            "last_category": [CATEGORIES[k] for k in rng.integers(0, len(CATEGORIES), users)],
            "session_embedding": [json.dumps(np.round(rng.normal(size=4), 3).tolist()) for _ in range(users)],
            "event_timestamp": [
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - s)) for s in rng.integers(0, 86_400, users)
            ],
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("feature-data"))
    parser.add_argument("--users", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    now = time.time()
    pq.write_table(user_profile(args.users, rng, now), args.out / "user_profile.parquet")
    pa_csv.write_csv(user_activity(args.users, rng, now), args.out / "user_activity.csv")
    print(f"wrote {args.out / 'user_profile.parquet'} and {args.out / 'user_activity.csv'}")


if __name__ == "__main__":
    main()
