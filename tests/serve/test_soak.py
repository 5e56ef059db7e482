"""The quick variant of bench/soak_server.py: 20 s of valid, malformed, oversized, slow and idle
clients against one real server process; the script itself asserts the outcome (0 wrong answers,
0 lost valid requests, every bad client refused or cut off, bounded RSS, clean exit)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_quick_soak(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "soak_server.py"), "--duration", "20",
                        "--json", str(tmp_path / "soak.json")], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = json.loads((tmp_path / "soak.json").read_text())
    counts = figures["counts"]
    assert figures["passed"] and counts.get("valid_wrong", 0) == 0 and counts.get("valid_lost", 0) == 0
    # Every kind of client actually ran: a soak that skipped one would pass by accident.
    for kind in ("valid_ok", "malformed_400", "slow_idle_closed", "slow_trickle_closed"):
        assert counts.get(kind, 0) > 0, (kind, counts)
    assert counts.get("oversized_413", 0) + counts.get("oversized_closed", 0) > 0, counts
    assert figures["server_exit"] == 0
