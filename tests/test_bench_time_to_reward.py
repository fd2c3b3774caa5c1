"""The time-to-reward benchmark runs end to end in a tiny configuration (so it cannot rot), and its summary
finds thresholds, times and speed-ups as documented."""
import json

from benchmarks import bench_time_to_reward as b


def test_time_to_reward_smoke(tmp_path):
    # a budget below one epoch's time: every contender trains exactly one epoch
    rc = b.main(["--smoke", "--contenders", "ddpo_is,awm,ddpo_is+window2", "--seeds", "0", "--budget-s", "0.001",
                 "--eval-samples", "20", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "time_to_reward_smoke.json").read_text())
    assert set(data["runs"]) == {"ddpo_is", "awm", "ddpo_is+window2"}
    for runs in data["runs"].values():
        pts = runs[0]["points"]
        assert [p["epoch"] for p in pts] == [0, 1] and pts[1]["clock_s"] > 0
        assert all(-20 < p["reward"] <= 0 and -20 < p["heldout"] <= 0 and p["diversity"] > 0 for p in pts)
    assert (tmp_path / "time_to_reward_smoke.md").read_text().count("|") > 20
    assert (tmp_path / "time_to_reward_smoke.png").stat().st_size > 0


def test_summary_threshold_and_speedup():
    def run(rewards, step=10.0):
        return {"overrides": [], "points": [{"epoch": i, "clock_s": i * step, "samples": i * 100, "reward": r, "heldout": r,
                                             "diversity": 0.1} for i, r in enumerate(rewards)]}

    runs = {"ddpo_is": [run([-4, -3, -2, -1]), run([-4, -3, -2, -1])], "fast": [run([-4, -1.5, -1], step=5.0)],
            "slow": [run([-4, -3.9, -3.8])]}
    s = b.summarize(runs)
    assert s["threshold"] == -4 + 0.75 * 3  # 75% of the way from -4 to -1
    assert s["table"]["ddpo_is"]["time_s"] == [30.0, 30.0] and s["table"]["fast"]["time_s"] == [5.0]
    assert s["table"]["fast"]["speedup"] == 6.0 and s["table"]["slow"]["reached"] == 0 and s["table"]["slow"]["speedup"] is None


def test_budget_cut_and_reuse(tmp_path):
    pts = [{"epoch": i, "clock_s": 40.0 * i} for i in range(4)]  # 0, 40, 80, 120 s
    run = {"overrides": ["algo=ddpo_is"], "seed": 0, "points": pts}
    assert [p["epoch"] for p in b.within_budget(run, 70)["points"]] == [0, 1, 2]  # up to the first point past it
    assert b.within_budget(run, 121) is None  # stops short: not reusable
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"machine": {"commit": "abc"}, "runs": {"ddpo_is": [run]}}))
    reused = b.reusable(path, 70)
    assert list(reused) == [("ddpo_is", ("algo=ddpo_is",), 0)] and reused[("ddpo_is", ("algo=ddpo_is",), 0)]["commit"] == "abc"
    assert b.reusable(path, 500) == {}
