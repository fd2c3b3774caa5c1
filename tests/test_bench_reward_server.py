"""The reward-server load benchmark runs end to end in a tiny configuration (so it cannot rot)."""
import json

from benchmarks import bench_reward_server as b


def test_reward_server_bench_smoke(tmp_path):
    assert b.main(["--smoke", "--seconds", "0.4", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "reward_server_smoke.json").read_text())
    assert {(r["mode"], r["clients"], r["size"], r["body"]) for r in data["rows"]} == (
        {(m, n, 64, "binary") for m in ("batching", "batching, fixed wait", "one at a time") for n in (1, 4)}
        | {(m, 4, 128, body) for m in ("batching", "one at a time") for body in ("json", "binary")})
    assert all(r["server_cpu_ms_per_request"] > 0 for r in data["rows"])
    assert all(r["requests"] > 0 and r["mixed"] == 0 and r["error_count"] == 0 for r in data["rows"])
    s = data["summary"]
    assert set(s["reward_ms_per_call"]) == {"8", "32", "128"} and [m for m, *_ in b.body_pairs(data)] == list(b.BODY_MODES)
    assert s["fuzz_5xx"] == 0 and s["fuzz_4xx"] == s["fuzz_cases"] >= 30 and s["alive_after_fuzz"]
    assert "images/s" in (tmp_path / "reward_server_smoke.md").read_text()
