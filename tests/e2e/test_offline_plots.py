"""`dvc plots show` renders without network: the setup-time template inlines vega, vega-lite and vega-embed."""
from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.conftest import REPO, copy_project, run_dvc

TEMPLATE = REPO / "build" / "plots" / "index.html"


@pytest.mark.skipif(not TEMPLATE.exists(), reason="no build/plots/index.html: scripts/vendor_plots.sh found no npm")
def test_dvc_plots_page_loads_nothing_from_the_network(tmp_path):
    root = copy_project(tmp_path / "project")
    (root / "build" / "plots").mkdir(parents=True)
    shutil.copy(TEMPLATE, root / "build" / "plots" / "index.html")
    assert run_dvc(root, "config", "--local", "plots.html_template", "../build/plots/index.html").returncode == 0
    rows = [{"nfe": n, "sw2": 1.0 / n} for n in (1, 2, 4, 8)]
    (root / "quality.json").write_text(json.dumps(rows))
    r = run_dvc(root, "plots", "show", "quality.json", "-x", "nfe", "-y", "sw2")
    assert r.returncode == 0, r.stderr[-2000:]
    page = (root / "dvc_plots" / "index.html").read_text()
    assert not re.search(r"""<(script|link)[^>]+(src|href)\s*=\s*["']?(https?:)?//""", page), "a remote resource"
    assert "cdn.jsdelivr" not in page
    packages = (REPO / "build" / "plots" / ".packages").read_text().split()
    for package in packages:  # each library inlined, by the comment the template writes before it
        assert f"/* {package} from the npm registry */" in page
    assert "vegaEmbed(" in page and '"sw2"' in page  # the plot itself, with its data
