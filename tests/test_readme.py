"""The README's Python examples run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should carry at least one Python example"
    for code in blocks:
        namespace: dict = {}
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102


def test_demo_cli_runs_fast_mode(capsys, tmp_path):
    from kfac_jax_peft.__main__ import main

    png = tmp_path / "demo.png"
    assert main(["demo", "--steps", "12", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    for arm in ("AdamW", "no clip", "pre-clip", "Newton-step clip"):
        assert arm in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
