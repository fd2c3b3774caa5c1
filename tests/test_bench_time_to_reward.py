"""The time-to-reward benchmark runs end to end in a tiny configuration (so it cannot rot), and its summary
finds thresholds, times and speed-ups as documented."""
import json

import pytest

from benchmarks import bench_time_to_reward as b


def test_time_to_reward_smoke(tmp_path):
    # a budget in denoiser passes below one epoch's: every contender trains exactly one epoch
    rc = b.main(["--smoke", "--contenders", "ddpo_is,awm,ddpo_is+window2", "--seeds", "0", "--budget-passes", "1",
                 "--eval-samples", "20", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "time_to_reward_smoke.json").read_text())
    assert set(data["runs"]) == {"ddpo_is", "awm", "ddpo_is+window2"}
    for runs in data["runs"].values():
        pts = runs[0]["points"]
        assert [p["epoch"] for p in pts] == [0, 1] and pts[1]["clock_s"] > 0
        assert all(-20 < p["reward"] <= 0 and -20 < p["heldout"] <= 0 and p["diversity"] > 0 for p in pts)
    assert data["machine"]["budget_passes"] == 1 and data["machine"]["budget_s"] is None
    md = (tmp_path / "time_to_reward_smoke.md").read_text()
    assert md.count("|") > 20 and "1 denoiser passes of training per run" in md
    assert b.main(["--smoke", "--budget-passes", "0", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "time_to_reward_smoke.png").stat().st_size > 0


def test_flow_world_smoke_with_passes_guards_and_sweep(tmp_path):
    # the flow world: Flow-GRPO as the baseline, held-out prompts and layout-correct rates as guards, denoiser passes
    # counted; --sweep runs three learning rates on seed 0 and reports the fresh seed
    rc = b.main(["--world", "flow-digits", "--smoke", "--contenders", "dgpo", "--seeds", "1", "--budget-s", "0.001",
                 "--eval-samples", "8", "--sweep", "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "time_to_reward_flow_smoke.json").read_text())
    assert set(data["runs"]) == {"grpo", "dgpo"} and data["summary"]["baseline"] == "grpo"
    assert {len(v) for v in data["sweep"].values()} == {3}
    assert all("reward" in r["points"][-1] and "train_reward" in r["points"][-1] for v in data["sweep"].values() for r in v)
    lrs = sorted(r["learning_rate"] for r in data["sweep"]["grpo"])
    assert abs(lrs[2] / lrs[0] - 9) < 1e-3  # x 1/3 and x 3 around the preset's
    for runs in data["runs"].values():
        assert runs[0]["seed"] == 1
        p0, p1 = runs[0]["points"]
        assert p0["passes"] == 0 and p1["passes"] > 0 and 0 <= p1["layout_correct"] <= 1
        assert {"heldout", "heldout_prompts", "heldout_prompts_layout_correct", "diversity"} <= set(p1)
    md = (tmp_path / "time_to_reward_flow_smoke.md").read_text()
    assert "denoiser passes to threshold" in md and "heldout prompts at threshold" in md
    assert b.main(["--world", "flow-digits", "--sweep", "--seeds", "0", "--out", str(tmp_path)]) == 2  # tuned on seed 0


def test_summary_threshold_and_speedup():
    def run(rewards, step=10.0, passes=1000):
        return {"overrides": [], "points": [{"epoch": i, "clock_s": i * step, "samples": i * 100, "passes": i * passes, "reward": r,
                                             "heldout": r, "diversity": 0.1} for i, r in enumerate(rewards)]}

    runs = {"ddpo_is": [run([-4, -3, -2, -1]), run([-4, -3, -2, -1])], "fast": [run([-4, -1.5, -1], step=5.0, passes=4000)],
            "slow": [run([-4, -3.9, -3.8])]}
    s = b.summarize(runs)
    assert s["threshold"] == -4 + 0.75 * 3  # 75% of the way from -4 to -1
    assert s["table"]["ddpo_is"]["time_s"] == [30.0, 30.0] and s["table"]["fast"]["time_s"] == [5.0]
    assert s["table"]["fast"]["speedup"] == 6.0 and s["table"]["slow"]["reached"] == 0 and s["table"]["slow"]["speedup"] is None
    # in denoiser passes the fast contender's epochs cost 4x more: 3000 passes against 4000
    assert s["table"]["fast"]["passes"] == [4000] and s["table"]["fast"]["speedup_passes"] == 0.75
    assert s["table"]["fast"]["heldout_at_threshold"] == [-1.5]
    # the plot's highlight follows the budget's unit: in passes a contender 2x faster there wins over "fast"
    runs["lean"] = [run([-4, -3.5, -1.5], step=12.0, passes=500)]
    s = b.summarize(runs)
    assert s["table"]["lean"]["speedup_passes"] == 3.0 and s["table"]["lean"]["speedup"] == 1.25
    assert b.fastest_contender(s, "speedup") == "fast" and b.fastest_contender(s, "speedup_passes") == "lean"
    assert b.fastest_contender({"baseline": "ddpo_is", "table": {"ddpo_is": s["table"]["ddpo_is"]}}) is None


def test_eval_prompts_cover_the_pool():
    pool = [f"p{i}" for i in range(308)]
    got = b.eval_prompts(pool, 128, 4)
    assert len(got) == 128 and got[:4] == ["p0"] * 4 and len(set(got)) == 32
    assert max(int(p[1:]) for p in got) > 290  # the last kinds of prompt are judged too, not only the first 32
    assert b.eval_prompts(pool[:10], 20, 1) == pool[:10] * 2


def test_budget_cut_and_reuse(tmp_path):
    pts = [{"epoch": i, "clock_s": 40.0 * i, "passes": 1000 * i * i} for i in range(4)]  # 0, 40, 80, 120 s
    run = {"overrides": ["algo=ddpo_is"], "seed": 0, "points": pts}
    assert [p["epoch"] for p in b.within_budget(run, 70)["points"]] == [0, 1, 2]  # up to the first point past it
    assert b.within_budget(run, 121) is None  # stops short: not reusable
    # a budget in denoiser passes cuts on the trainer's count (0, 1000, 4000, 9000), not on the clock
    assert [p["epoch"] for p in b.within_budget(run, 1000, "passes")["points"]] == [0, 1]
    assert [p["epoch"] for p in b.within_budget(run, 4001, "passes")["points"]] == [0, 1, 2, 3]
    assert b.within_budget(run, 9001, "passes") is None
    path = tmp_path / "old.json"
    swept = {"overrides": ["algo=ddpo_is", "train.learning_rate=0.001"], "seed": 0, "points": pts, "commit": "def"}
    path.write_text(json.dumps({"machine": {"commit": "abc"}, "runs": {"ddpo_is": [run]}, "sweep": {"ddpo_is": [swept]}}))
    reused = b.reusable(path, 70)
    assert sorted(reused) == [(("algo=ddpo_is",), 0), (("algo=ddpo_is", "train.learning_rate=0.001"), 0)]
    assert reused[(("algo=ddpo_is",), 0)]["commit"] == "abc"  # the file's commit where a run names none
    assert reused[(("algo=ddpo_is", "train.learning_rate=0.001"), 0)]["commit"] == "def"  # sweep runs are reused too
    assert b.reusable(path, 500) == {}
    assert len(b.reusable(path, 5000, "passes")[(("algo=ddpo_is",), 0)]["points"]) == 4
    other = tmp_path / "other.json"  # several files: a run found in both comes from the first
    other.write_text(json.dumps({"machine": {"commit": "xyz"}, "runs": {"ddpo_is": [run]}}))
    assert b.reusable([other, path], 70)[(("algo=ddpo_is",), 0)]["commit"] == "xyz"
    assert len(b.reusable([other, path], 70)) == 2


@pytest.mark.parametrize("world", sorted(b.WORLDS))
def test_every_contender_is_a_valid_config_of_its_world(world):
    # a typo in a contender's overrides would otherwise surface an hour into a full run
    from diffrl_fast.config_utils import load_config
    from diffrl_fast.train.config import PRESETS, Config, validate

    w = b.WORLDS[world]
    for name, overrides in w["contenders"].items():
        validate(load_config(Config, PRESETS / w["preset"], list(overrides)))
