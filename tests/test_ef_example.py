"""The 2-D least-squares example: it writes its PNG, and its iEF field is NGD's."""

import importlib.util
import pathlib

import numpy as np

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ef_least_squares.py"


def _load():
    spec = importlib.util.spec_from_file_location("ef_least_squares", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_writes_png_and_ief_field_equals_ngd(tmp_path):
    out = tmp_path / "fields.png"
    fields = _load().main(["--out", str(out), "--grid", "4", "--steps", "1"])
    assert out.stat().st_size > 10_000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # float64 inside the example; iEF and NGD are the same damped solve
    np.testing.assert_allclose(fields["ief"], fields["ngd"], rtol=1e-8, atol=1e-12)
    cos = np.sum(fields["ef"] * fields["ngd"], 1) / (
        np.linalg.norm(fields["ef"], axis=1) * np.linalg.norm(fields["ngd"], axis=1))
    assert cos.min() < 0.95  # EF bends the field somewhere on the grid
