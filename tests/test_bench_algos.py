"""`diffrl-fast experiment algos` plumbing (a smoke run, not a measurement) and its reuse of finished runs."""
import json

from benchmarks.bench_algos import main


def test_quick_experiment_writes_results_and_reuses_finished_runs(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--quick", "--only", "ddpo_is", "--part", "algos", "--out", str(out), "--workdir", str(work)]
    assert main(args) == 0
    data = json.loads((out / "algos_quick.json").read_text())
    run = data["results"]["ddpo_is"][0]
    assert len(run["records"]) == 2 and run["samples"] == 16
    assert "| ddpo_is |" in (out / "algos_quick.md").read_text()
    metrics = work / "ddpo_is_s0" / "metrics.jsonl"
    stamp = metrics.stat().st_mtime_ns
    assert main(args) == 0  # the finished run with the same settings is reused, not retrained
    assert metrics.stat().st_mtime_ns == stamp
    assert json.loads((out / "algos_quick.json").read_text())["results"]["ddpo_is"][0]["after"] == run["after"]
    (out / "algos_quick_reading.md").write_text("## Reading\nhand-written\n")
    assert main(["--quick", "--rewrite", "--out", str(out)]) == 0  # markdown from the JSON, nothing trained
    assert "hand-written" in (out / "algos_quick.md").read_text() and metrics.stat().st_mtime_ns == stamp


def test_overopt_verdict_needs_two_standard_errors():
    from benchmarks.bench_algos import overopt_verdict

    row = lambda v: {"heldout_at_level": v}  # noqa: E731
    assert "does not mitigate" in overopt_verdict({"ddpo_is": row([-5.0, -4.8, -5.2]), "tdpo_r": row([-4.9, -4.6, -5.1])})
    assert "**TDPO-R mitigates" in overopt_verdict({"ddpo_is": row([-5.0, -4.9, -5.1]), "tdpo_r": row([-3.0, -3.1, -2.9])})
    assert "not measured" in overopt_verdict({"ddpo_is": row([-5.0])})
