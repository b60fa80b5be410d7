"""`python evaluate.py`: the same protocol before and after fine-tuning, and its bad inputs."""

from __future__ import annotations

import json

import pytest
from _support import FAST, ROOT, run_train

import t2ilab.evaluate as evaluate_module
from t2ilab.errors import UserError

EVAL_FAST = [o for o in FAST if o.startswith(("eval.", "logger="))]
METRICS = {"dino", "clip_i", "clip_t", "pres", "div"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ev") / "run"
    proc = run_train(["experiment=dreambooth", *FAST, "trainer.max_steps=2"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def _evaluate(args, out_dir):
    proc = run_train(args, out_dir, script="evaluate.py")
    return proc, (out_dir / "results.json")


def test_evaluating_a_run_reproduces_its_training_metrics(trained, tmp_path):
    proc, results = _evaluate([f"run_dir={trained}", *EVAL_FAST], tmp_path / "after")
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(results.read_text())
    during = json.loads((trained / "results.json").read_text())
    assert after["experiment"] == "evaluate" and after["status"] == "ok"
    assert after["factors"]["run_dir"] == str(trained)
    # Same prompts, seeds, sampler and evaluators as the end-of-fit evaluation.
    for name in METRICS:
        assert after["metrics"][name] == pytest.approx(during["metrics"][name], abs=1e-4), name
    assert (tmp_path / "after" / "samples" / "prompts.csv").is_file()


def test_base_model_gives_comparable_before_numbers(trained, tmp_path):
    proc, results = _evaluate(EVAL_FAST, tmp_path / "before")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads(results.read_text())["metrics"]
    after = json.loads((trained / "results.json").read_text())["metrics"]
    assert set(before) == set(after) - {"train_loss"}
    assert before != {k: after[k] for k in before}  # fine-tuning changed the model


def test_fid_and_kid_against_a_reference_folder(trained, tmp_path):
    reference = ROOT / "data" / "example_subject"
    proc, results = _evaluate(
        [
            f"export_dir={trained / 'export'}",
            *EVAL_FAST,
            f"eval.reference_dir={reference}",
            "eval.fid_feature=dino",
        ],
        tmp_path / "fid",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(results.read_text())["metrics"]
    assert {"fid", "kid"} <= set(metrics) and metrics["fid"] >= 0


@pytest.mark.parametrize(
    "overrides,match",
    [
        (lambda t: [f"run_dir={t}"], "has no export/"),
        (lambda t: [f"export_dir={t}"], "is not a diffusers pipeline folder"),
        (lambda t: [f"run_dir={t / 'missing'}"], "does not exist"),
        (lambda t: [f"eval.reference_dir={t}"], "reference_dir=.* has 0 images"),
        (
            lambda t: ["eval.evaluators=pretrained", f"eval.dino_model={t / 'no-dino'}"],
            "eval.dino_model",
        ),
        (lambda t: ["eval.div_distance=lpips"], "needs torchvision"),
        (lambda t: ["eval.subject_type=pet"], "eval.subject_type"),
    ],
)
def test_bad_evaluation_input(overrides, match, make_cfg, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    if "lpips" in str(overrides(tmp_path)):
        monkeypatch.setattr("t2ilab.metrics.protocol.lpips_available", lambda: False)

    def no_pipeline(*a, **k):
        raise AssertionError("the pipeline loaded before the input was checked")

    monkeypatch.setattr(evaluate_module, "load_pipeline", no_pipeline)
    cfg = make_cfg(*EVAL_FAST, *overrides(tmp_path), config_name="evaluate")
    with pytest.raises(UserError, match=match) as err:
        evaluate_module.evaluate(cfg)
    assert "\n" not in str(err.value)


def test_missing_evaluator_model_is_one_line_and_exit_2(tmp_path):
    proc, results = _evaluate(
        [
            *EVAL_FAST,
            "eval.evaluators=pretrained",
            "eval.local_files_only=true",
            "eval.dino_model=facebook/dino-vits16",
        ],
        tmp_path / "run",
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("t2ilab: error:")]
    assert "facebook/dino-vits16" in line and "--local-dir" in line
    assert json.loads(results.read_text())["status"] == "failed"
