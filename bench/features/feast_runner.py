"""Feast's side of the feature benchmark, run with the Python of Feast's own virtualenv:
`python feast_runner.py REPO_DIR`. It opens the repository's FeatureStore once, then answers one JSON
command per line on stdin with one line on stdout starting with `@@ ` (anything else on stdout is Feast
talking). Commands:

- {"op": "sample", "refs": [...], "ids": [...]}: the values of one read, by full feature name;
- {"op": "run", "refs": [...], "warmup": [[id, ...], ...], "batches": [[id, ...], ...]}: one unrecorded
  read per warm-up batch, then one `get_online_features` per batch in order, each timed alone; latencies
  in ms, wall seconds, and a check of the last answer;
- {"op": "gc"}: GC-tracked objects and the time of one full collection;
- {"op": "quit"}.

It imports nothing from the Fresco repository: only the standard library and Feast."""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from typing import Any

MARK = "@@ "
JOIN_KEY = "user_id"


def reply(payload: dict[str, Any]) -> None:
    sys.stdout.write(MARK + json.dumps(payload) + "\n")
    sys.stdout.flush()


def rows_of(batch: list[int]) -> dict[str, list[int]]:
    """Entity rows in the columnar form get_online_features takes (as {join key: values}): Feast turns a list
    of row dicts into this itself, and prebuilt it adds two objects per call to the heap, not 101."""
    return {JOIN_KEY: batch}


def gc_info() -> dict[str, Any]:
    """The size of this process's heap as the cyclic collector sees it, and how long one full collection takes."""
    began = time.perf_counter()
    gc.collect()
    return {"ok": True, "objects": len(gc.get_objects()), "full_collection_ms": (time.perf_counter() - began) * 1000}


def sample(store: Any, refs: list[str], ids: list[int]) -> dict[str, Any]:
    answer = store.get_online_features(features=refs, entity_rows=rows_of(ids), full_feature_names=True).to_dict()
    values = {ref: answer[ref.replace(":", "__")] for ref in refs}
    return {"ok": True, "values": values}


def _collections() -> list[int]:
    return [generation["collections"] for generation in gc.get_stats()]


def run(store: Any, refs: list[str], warmup: list[list[int]], batches: list[list[int]]) -> dict[str, Any]:
    """Time each get_online_features call (the call alone: entity rows are built beforehand, as a caller
    holding its entities would; the answer is Feast's OnlineResponse around its response proto)."""
    for batch in warmup:
        store.get_online_features(features=refs, entity_rows=rows_of(batch))
    requests = [rows_of(batch) for batch in batches]
    latencies = []
    answer = None
    collections = _collections()
    clock = time.perf_counter
    began = clock()
    for entity_rows in requests:
        start = clock()
        answer = store.get_online_features(features=refs, entity_rows=entity_rows)
        latencies.append((clock() - start) * 1000)
    seconds = clock() - began
    check: dict[str, Any] = {}
    if answer is not None:
        start = clock()
        values = answer.to_dict()
        check["to_dict_ms"] = (clock() - start) * 1000
        features = [name for name in values if name != JOIN_KEY]
        check["columns"] = len(features)
        check["rows"] = len(values[features[0]]) if features else 0
        check["non_null"] = sum(value is not None for name in features for value in values[name])
    return {
        "ok": True,
        "latencies_ms": latencies,
        "seconds": seconds,
        "check": check,
        "gc_collections": [after - before for after, before in zip(_collections(), collections, strict=True)],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: feast_runner.py REPO_DIR", file=sys.stderr)
        return 2
    try:
        import feast  # type: ignore[import-not-found]  # only in Feast's virtualenv

        store = feast.FeatureStore(repo_path=argv[0])
        store.refresh_registry()
    except Exception:  # noqa: BLE001 - reported to the benchmark, which prints it
        reply({"ok": False, "error": traceback.format_exc()})
        return 1
    reply({"ok": True, "version": feast.__version__, "python": sys.version.split()[0]})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            command = json.loads(line)
            op = command["op"]
            if op == "quit":
                reply({"ok": True})
                return 0
            if op == "sample":
                reply(sample(store, command["refs"], command["ids"]))
            elif op == "gc":
                reply(gc_info())
            elif op == "run":
                reply(run(store, command["refs"], command["warmup"], command["batches"]))
            else:
                reply({"ok": False, "error": f"unknown op {op!r}"})
        except Exception:  # noqa: BLE001 - one failed command must not end the session
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
