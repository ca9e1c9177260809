"""The fault drills of bench/fault_drills.py in their short form: a real ranker under 4-client load with a real
Redis that is killed and restarted, knowledge versions flipped under load, a corrupt snapshot published, a worker
process of a 2-worker ranker killed with SIGKILL under load, and a knowledge build killed with SIGKILL and
resumed."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from tests.required import require

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.slow
def test_fault_drills_short_form(tmp_path):
    require(shutil.which("redis-server"), "redis-server is not installed (apt-get install redis-server)")
    import fault_drills

    out = tmp_path / "drills.json"
    code = fault_drills.main(["--short", "--work", str(tmp_path / "work"), "--json", str(out)])
    report = json.loads(out.read_text())
    rows = {r["drill"]: r for r in report["rows"]}
    assert set(rows) == {"redis-outage", "version-flips", "corrupt-publish", "kill-9-worker", "kill-9-build"}
    assert code == 0 and report["failures"] == [], report["failures"]

    outage = rows["redis-outage"]
    assert outage["5xx"] == 0 and outage["answers_while_down"] > 0
    assert outage["fallbacks"]["user/redis_unavailable"] > 0 and outage["recovery_s"] is not None

    flips = rows["version-flips"]
    assert flips["non_2xx"] == 0 and flips["answers_mixing_versions"] == 0
    assert len(flips["versions_answered"]) >= 4  # the load saw most of the 5 versions
    assert flips["checked_distinguishable"] > 0.8 * flips["answers_checked"]  # a mix would have been visible

    corrupt = rows["corrupt-publish"]
    assert corrupt["publish_refused"] and corrupt["current_after"] == corrupt["current_before"]
    assert corrupt["non_2xx"] == 0 and corrupt["versions_answered"] == [corrupt["current_before"]]

    worker = rows["kill-9-worker"]
    assert worker["http_5xx"] == 0 and worker["server_alive"] and worker["replaced_after_s"] is not None
    # Only requests in flight on the killed worker's connections fail, at most one per connection.
    assert worker["failed"] == worker["failed_on_killed_worker"] <= worker["connections_on_killed_worker"]
    assert worker["answered_while_replacing"] > 0  # the other worker kept serving

    build = rows["kill-9-build"]
    assert build["killed_after_user_shards"] and not build["visible_after_kill"]
    assert build["equal_to_uninterrupted"]
