"""utils.io.save_figure: the one way visto writes a plot (atomic PNG, figure closed)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402

from visto.utils.io import save_figure  # noqa: E402


def test_save_figure_writes_a_png_atomically_and_closes_the_figure(tmp_path):
    fig, ax = plt.subplots(figsize=(2, 1))
    ax.plot([0, 1], [1, 0])
    out = save_figure(fig, tmp_path / "plots" / "curve.png", dpi=50)
    assert out == tmp_path / "plots" / "curve.png"
    assert Image.open(out).size == (100, 50)  # 2 x 1 inches at dpi 50
    assert fig.number not in plt.get_fignums()  # closed: a long run does not pile up figures
    assert [p.name for p in out.parent.iterdir()] == ["curve.png"]  # no temp file left
