"""The short version of the papers' end-to-end experiments (nanocustom/endtoend.py --quick): every experiment
runs through train.py, sample-time merging and LAG on the shapes model, and yields a fraction for each measure.
The full figures (python -m nanocustom.endtoend all) are the README's; at 20 training steps they mean little."""
import json
import math
import subprocess

import pytest

from nanocustom import endtoend


def fractions(tree):
    for value in tree.values():
        yield from fractions(value) if isinstance(value, dict) else [value]


def test_every_experiment_runs_end_to_end_and_scores_fractions(tmp_path):
    results = endtoend.main(["all", "--quick", "--steps", "10", "--json", str(tmp_path / "e2e.json")])
    runs = ["custom", "svdiff", "residual", "residual, LAG", "residual, base unconditional",
            "residual, LAG + base unconditional", "residual, token trained",
            "residual, token trained, LAG + base unconditional", "custom + regularisation images"]
    assert list(results["personalize"]) == ["base model", *runs]
    for method in runs:
        assert set(results["personalize"][method]) == {"presence", "class prompt: plain member",
                                                       "class prompt: concept leaks"}
    assert "presence" not in results["personalize"]["base model"]  # the base model has no <new1> to ask for
    assert list(results["compose"]) == ["lagrangian merge", "add merge", "joint training",
                                        "control: a pair the base model draws"]
    control = results["compose"]["control: a pair the base model draws"]
    assert list(control) == ["in words", "lagrangian merge", "add merge", "joint training", "svdiff combined",
                             "residual combined", "residual combined, LAG + base unconditional"]
    assert all(list(r) == ["both", "red square", "blue circle"] for r in control.values())
    assert list(results["lag"]) == ["varied backgrounds", "one background (yellow)"]
    assert all(list(r) == ["blue", "green", "black"] for r in results["lag"].values())
    assert all(set(c) == {"plain", "LAG"} for r in results["lag"].values() for c in r.values())
    assert list(results["words"]) == ["concepts in words", "the pair in words", "two patterned objects"]
    assert list(results["words"]["concepts in words"]) == list(endtoend.toy.CONCEPTS)
    values = list(fractions(results))
    assert len(values) == 2 + 9 * 3 + 3 * 3 + 7 * 3 + 2 * 3 * 2 + 4 + 3 + 2
    assert all(0.0 <= v <= 1.0 and not math.isnan(v) for v in values)
    written = json.loads((tmp_path / "e2e.json").read_text())
    assert written.pop("protocol") == {"images per prompt": 4, "DDIM steps": 10, "guidance": 6.0,
                                       "training seed": 0, "quick": True}
    assert written == results


def test_the_training_seed_reaches_train_py(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(endtoend.subprocess, "run",
                        lambda argv, **_: calls.append(argv) or subprocess.CompletedProcess(argv, 0))
    endtoend.train(tmp_path / "d.safetensors", "residual", [endtoend.A], "--steps", 20, seed=2)
    argv = calls[0]
    assert argv[argv.index("--seed") + 1] == "2" and argv[argv.index("--steps") + 1] == "20"
    assert argv[argv.index("--concept") + 1] == str(endtoend.toy.CONCEPTS_DIR / endtoend.A)


def test_zero_sampling_steps_is_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as refused:
        endtoend.main(["personalize", "--steps", "0"])
    assert refused.value.code == 2 and "--steps 0: a sample needs at least 1 DDIM step" in capsys.readouterr().err
