"""bench/scale.py: the exponent fit gives exact power laws back, every
figure not measured is marked, laws linear or affine by construction scale
exactly, and a tiny run (N = 200, 400; the index on real files and the
planner, each point in its own process) writes the JSON, table and PNG.
Nothing here depends on how fast anything runs."""
import json

import numpy as np
import pytest

from bench import scale, scale_files, scale_report
from bench.scale_report import IMAGENET_1K, IMAGENET_21K, TABLE_SIZES


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 1.37, 2.0])
def test_the_fit_gives_an_exact_power_law_back(power):
    ns = [10_000, 20_000, 50_000, 100_000]
    assert scale_report.fit_exponent(ns, [3.5 * n ** power for n in ns]) == pytest.approx(power, abs=1e-9)
    assert scale_report.fit_exponent(ns[:1], [1.0]) is None  # one N is no slope
    assert scale_report.fit_exponent(ns, [0.0] * 4) is None  # no log of zero


def measured(ns, f, base=100.0):
    return [{"n": n, "value": f(n), "peak_mb": base + 1e-4 * n, "base_mb": base} for n in ns]


def test_unmeasured_sizes_are_extrapolated_and_marked():
    ns = [10_000, 20_000, 50_000]
    got = scale_report.finish(scale.cost("search", "s", "clim", "fit", measured(ns, lambda n: 2e-9 * n ** 2)))
    assert got["exponent"] == pytest.approx(2.0)
    assert got["peak_exponent"] == pytest.approx(1.0)  # the part above the base grows as N
    status = {p["n"]: p["status"] for p in got["points"]}
    assert {n for n, s in status.items() if s == "measured"} == set(ns)
    assert {n for n, s in status.items() if s == "extrapolated"} == set(TABLE_SIZES) - set(ns)
    big = scale_report.at(got, IMAGENET_1K)
    assert big["value"] == pytest.approx(2e-9 * IMAGENET_1K ** 2)  # from the largest measured N
    assert big["peak_mb"] == pytest.approx(100.0 + 1e-4 * IMAGENET_1K)
    assert [p["n"] for p in got["points"]] == sorted(p["n"] for p in got["points"])
    row = scale_report.markdown([got], {"device_name": "cpu", "cpu_count": 2, "versions": {"torch": "x"},
                                        "date": "2026-12-02", "command": "python bench/scale.py"}, [])
    cells = next(x for x in row.splitlines() if x.startswith("| search |")).split("|")[3:7]
    assert "(ext.)" not in cells[0] and all("(ext.)" in c for c in cells[1:])  # 10k measured; 100k, 1.28M, 14.2M


def test_linear_and_affine_laws_scale_exactly():
    lin = scale_report.finish(scale.cost("bank", "MB", "knn", "linear", measured([1000, 3000], lambda n: 0.26 * n)))
    assert scale_report.at(lin, IMAGENET_21K)["value"] == pytest.approx(0.26 * IMAGENET_21K)
    aff = scale_report.finish(scale.cost("ckpt", "MB", "checkpoint", "affine",
                                         measured([1000, 2000, 4000], lambda n: 300 + 0.000265 * n)))
    assert scale_report.at(aff, IMAGENET_1K)["value"] == pytest.approx(300 + 0.000265 * IMAGENET_1K)
    assert scale_report.at(aff, IMAGENET_1K)["status"] == "extrapolated"
    assert scale_report.at(aff, IMAGENET_21K)["peak_mb"] == pytest.approx(100 + 1e-4 * IMAGENET_21K)  # the line


def test_a_peak_set_by_design_comes_from_its_formula():
    formula = {n: 2000.0 for n in TABLE_SIZES}  # a memory budget: the same at every N
    got = scale_report.finish(scale.cost("search", "s", "clim", "fit", measured([1000, 2000], lambda n: n ** 2),
                                         peak_formula=formula))
    assert scale_report.at(got, IMAGENET_21K)["peak_mb"] == pytest.approx(100.0 + 2000.0)


def test_the_work_dir_grows_and_its_trees_share_files(tmp_path):
    work = scale_files.WorkDir(tmp_path / "w")
    small, big = work.tree(30), work.tree(50)
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*.jpg"))  # noqa: E731
    assert len(files(small)) == 30 and len(files(big)) == 50 and set(files(small)) <= set(files(big))
    assert work.count() == 50 and (big / "c0007" / "00000007.jpg").samefile(work.pool / "c0007" / "00000007.jpg")
    assert len(set(scale_files.jpeg_variants())) == scale_files.VARIANTS
    fits, statement = work.largest_fitting(10 ** 15)  # more than any disk holds
    assert 50 <= fits < 10 ** 15 and "real files up to" in statement


def test_a_tiny_run_writes_every_point_and_marks_the_rest(tmp_path):
    out = tmp_path / "out"
    scale.main(["--sizes", "200,400", "--only", "index,planner", "--work-dir", str(tmp_path / "w"),
                "--out", str(out), "--plan-steps", "2", "--methods", "mosrep,clim"])
    result = json.loads((out / "scale.json").read_text())
    assert not result["errors"] and result["sizes"] == {"index": [200, 400], "planner": [200, 400]}
    names = [c["cost"] for c in result["costs"]]
    assert names[:3] == ["index cold", "index warm", "planner: epoch order"]
    assert [n for n in names if n.startswith("planner: step")] == [f"planner: step of 256, {m}"
                                                                   for m in ("mosrep", "clim")]
    for c in result["costs"]:
        assert {"cost", "unit", "law", "exponent", "points"} <= set(c)
        got = {p["n"]: p["status"] for p in c["points"]}
        assert got == {200: "measured", 400: "measured", **{n: "extrapolated" for n in TABLE_SIZES}}
        for p in c["points"]:
            assert {"n", "value", "peak_mb", "status"} <= set(p)
            assert p["status"] == "extrapolated" or np.isfinite(p["value"]) and p["value"] > 0
    cold = result["costs"][0]["points"][0]
    assert cold["peak_mb"] >= cold["base_mb"] > 0
    table = (out / "scale.md").read_text()
    assert "| index cold | s |" in table and table.count("(ext.)") >= 4 * len(names)
    pytest.importorskip("matplotlib")
    assert (out / "scale.png").stat().st_size > 0


def test_a_quadratic_law_scales_by_n_squared_whatever_the_fit():
    with_fixed_cost = measured([1000, 2000, 4000], lambda n: 50 + 1e-6 * n ** 2)  # the fit reads below 2
    got = scale_report.finish(scale.cost("table", "s", "clim", "quadratic", with_fixed_cost))
    assert got["exponent"] < 2
    largest = scale_report.at(got, 4000)["value"]
    assert scale_report.at(got, IMAGENET_1K)["value"] == pytest.approx(largest * (IMAGENET_1K / 4000) ** 2)
