"""Every python block of docs/kernels.md runs, in order, in one namespace (the page's snippets stay true)."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "kernels.md"


def test_kernels_page_snippets_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4, "docs/kernels.md lost its snippets"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/kernels.md block {i}", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["v_pred"].grad is not None and bool(namespace["v_pred"].grad.abs().sum() > 0)
    assert namespace["eps_u"].grad is not None and namespace["eps_c"].grad is not None
