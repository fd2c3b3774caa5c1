"""README.md and docs/*.md: every generated block agrees with its committed result file (benchmarks/docs.py)."""
from __future__ import annotations

import json

from benchmarks import docs


def test_every_generated_block_agrees_with_its_result_file():
    problems = docs.check()
    assert not problems, "\n".join(problems) + "\nrerun the benchmark, then `python -m benchmarks.docs --rewrite`"
    names = {m["name"] for d in docs.doc_files() for m in docs.MARKER.finditer(d.read_text())}
    assert {"main_job", "algos_table", "fsdp_units"} <= names


def test_the_check_fails_on_a_changed_figure_a_missing_file_and_dirty_code(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "r").mkdir()
    data = json.loads((docs.RESULTS / "fsdp_units.json").read_text())
    (tmp_path / "r" / "f.json").write_text(json.dumps(data))
    block = docs.render("fsdp_units", "r/f.json", tmp_path)
    doc = tmp_path / "README.md"
    doc.write_text(f"x\n<!-- generated: fsdp_units from r/f.json -->\n{block}<!-- end generated: fsdp_units -->\n")
    assert docs.check(tmp_path) == []
    doc.write_text(doc.read_text().replace("2.64%", "2.46%"))  # a typed edit
    assert docs.check(tmp_path) == ["README.md: block fsdp_units disagrees with r/f.json"]
    assert docs.check(tmp_path, rewrite=True) and docs.check(tmp_path) == []  # rewritten from the file
    data["machine"]["commit"] += "-dirty"
    (tmp_path / "r" / "f.json").write_text(json.dumps(data))
    assert "uncommitted code" in docs.check(tmp_path)[0]
    (tmp_path / "r" / "f.json").unlink()
    assert "is missing" in docs.check(tmp_path)[0]
