"""gpu_evidence.py's whole orchestration on CPU in quick mode: the folder, the numbers in it, the summary, and a part
cut at its budget."""

import importlib.util
import json
import re

import pytest

import evidence_report
import gpu_evidence
from evidence_report import _fmt


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("evidence")
    results = gpu_evidence.main(["--device", "cpu", "--quick", "--output-dir", str(out)])
    return out, results


def test_quick_run_fills_one_flat_folder(quick_run):
    out, results = quick_run
    has_train = importlib.util.find_spec("diffusers") is not None
    expected = {"results.json", "summary.md", "plot.png", "log.txt", "part-bench.json"} | (
        {"part-train.json"} if has_train else set())
    assert {p.name for p in out.iterdir()} == expected  # ≤ 8 files, no sub-folders: what a device run brings back
    assert all((out / name).stat().st_size > 0 for name in expected)
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    assert list(results["parts"]) == ["tests", "train", "profile", "bench"]  # the elastic benchmarks last
    assert [p["status"] for p in results["parts"].values()] == [
        "done", "done" if has_train else "skipped: diffusers is not installed", "skipped: needs a CUDA device", "done"]
    assert results["profile"] is None


def test_quick_run_counts_the_tests_it_ran(quick_run):
    out, results = quick_run
    tests = results["tests"]
    log = (out / "log.txt").read_text()
    assert tests["passed"] == len(re.findall(r"^tests/test_\w+\.py::.+? PASSED", log, re.M)) > 20
    assert tests["failed"] == tests["error"] == 0 and tests["selected"] == tests["passed"]
    assert f"{tests['passed']} passed, 0 failed, 0 errors" in (out / "summary.md").read_text()


def test_quick_run_measures_every_planned_row(quick_run):
    _, results = quick_run
    rows = results["rows"]
    trd = [r for r in rows if r["kind"] == "trd"]
    planned = sum(len(g["shapes"]) * len(g["modes"]) * len(g["dtypes"]) * len(g["impls"]) * len(g["passes"])
                  for g in results["plan"]["groups"])
    assert len(trd) == planned and not any(r.get("skipped") or r.get("oom") for r in trd)
    for r in trd:
        assert r["n_samples"] >= 3 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["kernel_ms"] > 0 and r["kernels"] and r["max_rel_err"] < 1e-4
        assert r["matmul_tflops"] > 0 and r["frac_of_matmul"] == pytest.approx(r["tflops"] / r["matmul_tflops"])
        assert r["telemetry_samples"] == 0  # no GPU: no clock readings, and none invented
        if r["inputs"] == "correlated":
            assert r["active_share"] == pytest.approx(0.5, abs=0.05)
    assert {r["inputs"] for r in trd} == {"correlated", "randn"}
    shapes = {s for g in results["plan"]["groups"] for s in g["shapes"]}
    references = [r for r in rows if r["kind"] == "reference"]
    for shape in shapes:  # copy bandwidth and three GEMM rates measured next to every shape
        assert {(r["what"], r.get("dtype")) for r in references if r["shape"] == shape} == {
            ("copy", None), ("gemm", "bf16"), ("gemm", "fp16"), ("gemm", "fp32")}
    assert sorted(r["dtype"] for r in references if r["what"] == "gemm-peak") == ["bf16", "fp16", "fp32"]


def test_summary_holds_the_headline_numbers_of_the_rows(quick_run):
    out, results = quick_run
    summary = (out / "summary.md").read_text()
    env = results["environment"]
    assert summary.startswith(f"# TRD loss evidence — {env['device']} — {env['date']}")
    assert f"commit `{env['commit']}`" in summary
    paper = {r["impl"]: r for r in results["rows"] if r["kind"] == "trd" and r["shape"] == "paper-quick"
             and r["pass"] == "fwd+bwd" and r["mode"] == "full" and r["inputs"] == "correlated"}
    torch_row, naive = paper["torch"], paper["naive"]
    headline = summary.split("## Paper shape (paper-quick), fp32, full, fwd+bwd")[1].split("##")[0]
    cells = next(line for line in headline.splitlines() if line.startswith("| torch |")).split(" | ")
    assert cells[1] == _fmt(torch_row["ms"]) and cells[3] == _fmt(torch_row["peak_mib"])
    assert cells[4] == f"{naive['ms'] / torch_row['ms']:.2f}×"
    assert cells[7] == f"{100 * torch_row['peak_mib'] / naive['peak_mib']:.1f} %"
    for part, record in results["parts"].items():
        budget, used = _fmt(record["budget_s"], 4), _fmt(record["seconds"], 4)
        assert f"| {part} | {budget} | {used} | {record['status']} |" in summary
    assert summary.count("not measured: no Triton rows in this run") == 5  # every target, none faked on CPU
    assert [t["met"] for t in results["targets"]] == [None] * 5


def test_summary_holds_the_profile_parts_kernel_rates(quick_run):
    _, results = quick_run
    peak = next(r["tflops"] for r in results["rows"] if r.get("what") == "gemm-peak" and r["dtype"] == "bf16")
    profile = {"kernels": [dict(shape=[4, 3600, 768], variant="triangle", kernel="pass 1", ms=0.25, tflops=350.0),
                           dict(shape=[4, 3600, 768], variant="triangle", kernel="all kernels", ms=0.5)],
               "graph_replay_ms": {"two-pass": 0.49, "naive": 2.15}}
    summary = evidence_report.summarize({**results, "profile": profile})
    assert f"| B4 N3600 D768 | triangle | pass 1 | 0.25 | 350 | {100 * 350 / peak:.0f} % |" in summary
    assert "| B4 N3600 D768 | triangle | all kernels | 0.5 | – | – |" in summary
    assert "replayed as a CUDA graph: two-pass 0.49 ms, naive 2.15 ms" in summary


def test_a_part_past_its_budget_is_cut_and_recorded(tmp_path):
    (tmp_path / "part-profile.json").write_text('{"kernels": [], "graph_replay_ms": {}}')  # an earlier run's
    results = gpu_evidence.main(["--device", "cpu", "--quick", "--parts", "tests", "--tests-budget-s", "0.5",
                                 "--output-dir", str(tmp_path)])
    assert results["parts"]["tests"]["status"] == "cut at its 0.5 s budget"
    assert results["parts"]["tests"]["seconds"] < 10
    summary = (tmp_path / "summary.md").read_text()
    assert "| tests | 0.5 | " in summary and "cut at its 0.5 s budget" in summary
    assert {p.name for p in tmp_path.iterdir()} == {"results.json", "summary.md", "log.txt"}
    assert results["profile"] is None


def test_pytest_lines_are_counted_with_and_without_workers():
    assert gpu_evidence.parse_pytest(["collected 124 items\n"])["selected"] == 124
    plain = ["collected 7 items / 2 deselected / 5 selected\n", "tests/t.py::test_a[x-1] PASSED  [ 20%]\n",
             "tests/t.py::test_b FAILED [ 40%]\n", "tests/t.py::test_c SKIPPED (no gpu) [ 60%]\n",
             "tests/t.py::test_d ERROR [ 80%]\n", "tests/t.py::test_e[margin must be >= 0] PASSED [100%]\n"]
    counts = gpu_evidence.parse_pytest(plain)
    assert [counts[k] for k in ("selected", "passed", "failed", "skipped", "error")] == [5, 2, 1, 1, 1]
    assert counts["failing"] == ["tests/t.py::test_b", "tests/t.py::test_d"]
    workers = ["4 workers [3 items]\n", "[gw0] [ 33%] PASSED tests/t.py::test_a[x-1] \n",
               "[gw1] [ 66%] PASSED tests/t.py::test_b \n", "[gw2] [100%] FAILED tests/t.py::test_c \n",
               "[gw3] [100%] FAILED tests/t.py::test_d[a (B, N) b] \n"]
    counts = gpu_evidence.parse_pytest(workers)
    assert (counts["selected"], counts["passed"], counts["failed"], counts["failing"]) == (
        3, 2, 2, ["tests/t.py::test_c", "tests/t.py::test_d[a (B, N) b]"])


def test_the_sweep_runs_coarse_sizes_first():
    assert gpu_evidence.coarse_first([1, 2, 3, 4, 5, 6, 7]) == [1, 3, 5, 7, 2, 4, 6]
    plan = gpu_evidence.evidence_plan("cuda", quick=False)
    assert [g.shapes[0].name for g in plan["groups"]] == ["paper", "paper", "paper", "sweep-1024"]
    assert plan["groups"][0].impls == ["two-pass", "fused", "torch", "naive", "compiled"]
    assert plan["groups"][1].active_share is None and plan["dtype"] == "bf16"
