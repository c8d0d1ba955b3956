"""bench.py's GPU suite, run on a tiny model on the CPU: every section reports its rows and none is skipped but
the CUDA-only ones, so that a session lent a GPU spends its minutes measuring, not mending the benchmark."""
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {  # section -> the rows it must report (benchmark names; group: config for the optimisation rows)
    "merge": {"Lagrangian merge, one factorisation for all matrices", "Lagrangian merge, lagrangian_merge per matrix"},
    "sampling": {"UNet step (guided: batch 2)", "one image, 50-step DDIM + CFG 7.5"},
    "training": {f"{method} step, nanocustom, {variant}" for method in ("custom", "svdiff", "residual")
                 for variant in ("uncached", "cached", "cached + grad checkpointing")}
    | {"Custom Diffusion step, diffusers reference (uncached)"},
    "optimisations": {"UNet step (batch 2): baseline: fp32, SDPA, eager",
                      "UNet step (batch 2): plain softmax attention", "UNet step (batch 2): bf16",
                      "UNet step (batch 2): channels_last",
                      "delta at inference (UNet step): baseline: no delta"}
    | {f"delta at inference (UNet step): {method}, {state}" for method in ("svdiff", "residual", "custom")
       for state in ("unfolded", "folded")},
}


def test_the_gpu_suite_reports_every_row_on_a_tiny_model(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--device", "cpu", "--suite", "gpu", "--tiny",
                          "--repeats", "1", "--compile-mode", "off", "--json", str(tmp_path / "bench.json"),
                          "--markdown", str(tmp_path / "BENCHMARKS.md")], capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    skipped = [line for line in run.stdout.splitlines() if "skipped" in line]
    assert all("CUDA only" in line or "--compile-mode off" in line for line in skipped), skipped
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    for section, expected in ROWS.items():
        rows = [r for r in results if r["section"] == section]
        names = {f"{r['group']}: {r['config']}" if section == "optimisations" else r["benchmark"] for r in rows}
        assert expected <= names, expected - names
        timings = rows if section == "optimisations" else [r[k] for r in rows for k in ("nanocustom", "diffusers")
                                                              if k in r]
        assert all(math.isfinite(t["median_s"]) and t["median_s"] > 0 for t in timings), section
    assert "## Optimisations on and off" in (tmp_path / "BENCHMARKS.md").read_text()
