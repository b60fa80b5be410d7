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


@pytest.mark.slow
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


@pytest.mark.slow
def test_base_model_gives_comparable_before_numbers(trained, tmp_path):
    proc, results = _evaluate(EVAL_FAST, tmp_path / "before")
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = json.loads(results.read_text())["metrics"]
    after = json.loads((trained / "results.json").read_text())["metrics"]
    assert set(before) == set(after) - {"train_loss"}
    assert before != {k: after[k] for k in before}  # fine-tuning changed the model


def test_a_flow_base_model_evaluates_with_its_own_sampler(tmp_path):
    """evaluate.py's sampler defaults to the objective's own: FlowMatchEuler for Flux."""
    proc, results = _evaluate(["model=tiny_flux", "eval=tiny", *EVAL_FAST], tmp_path / "base")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(results.read_text())["metrics"]) >= METRICS


@pytest.mark.slow
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


# Every kind of export, trained on a tiny model and evaluated with nothing given but the run:
# the figures equal the run's own end-of-training ones (same prompts, seeds, evaluators).
KINDS = {
    "lora": ["experiment=lora_dreambooth", "model=tiny_sd"],
    "textual_inversion": ["experiment=textual_inversion"],  # tiny_sd
    "adapters": ["experiment=adapter_dreambooth", "model=tiny_sd"],
    "pixart": ["experiment=dreambooth_pixart"],  # tiny_pixart
    "flux": ["experiment=dreambooth", "model=tiny_flux"],  # a flow-matching export
    "sd3_adapters": ["experiment=adapter_dreambooth", "model=tiny_sd3"],
    "dit": [  # class-conditional: scored as its run was, eval=toy_alignment
        "experiment=toy_pixart_stage1",
        "eval.toy_alignment.n=8",
        "eval.toy_alignment.num_inference_steps=2",
        "data.batch_size=4",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(KINDS))
def test_every_kind_of_export_evaluates_as_its_run_did(kind, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*KINDS[kind], *FAST], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc, results = _evaluate([f"run_dir={run_dir}"], tmp_path / "eval")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "size mismatch" not in proc.stderr
    after = json.loads(results.read_text())["metrics"]
    during = json.loads((run_dir / "results.json").read_text())["metrics"]
    names = {"shape_acc"} if kind == "dit" else METRICS
    assert set(after) >= names
    for name in names:
        assert after[name] == pytest.approx(during[name], abs=1e-4), name
    if kind == "dit":
        from diffusers import DiTPipeline

        labels = DiTPipeline.from_pretrained(run_dir / "export").get_label_ids(["star", "circle"])
        assert labels == [3, 0]  # t2ilab.toy.world.SHAPES order


def _fake_export(folder, metadata, pipeline_class=None):
    """An export's files as far as evaluate reads them before loading any weights."""
    folder.mkdir(parents=True)
    (folder / "t2ilab.json").write_text(json.dumps(metadata))
    if pipeline_class:
        (folder / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return folder


TINY_EVAL = {
    "enabled": True,
    "evaluators": "tiny_random",
    "div_distance": "dino",
    "images_per_prompt": 3,
    "prompts": ["a {identifier} {class_noun} on the moon"],
    "toy_alignment": {"enabled": False},
}


def _recorded(tmp_path, **changes):
    cfg = {
        "artefact": "lora",
        "model": {"name": "tiny_sd", "family": "sd", "resolution": 64},
        "base_model": None,
        "identifier": "sks",
        "class_noun": "star",
        "instance_dir": "data/toy_subjects/striped_star",
        "eval_preset": "toy",
        "eval": dict(TINY_EVAL),
    }
    return {**cfg, **changes}


@pytest.mark.parametrize(
    "overrides,expected",
    [
        ([], {"evaluators": "tiny_random", "images_per_prompt": 3}),
        (["eval.images_per_prompt=5"], {"evaluators": "tiny_random", "images_per_prompt": 5}),
        (["eval=toy"], {"evaluators": "pretrained", "images_per_prompt": 4}),
    ],
)
def test_the_runs_evaluation_applies_unless_the_command_line_names_one(
    overrides, expected, make_cfg, tmp_path
):
    export = _fake_export(tmp_path / "export", _recorded(tmp_path))
    cfg = make_cfg(f"export_dir={export}", *overrides, config_name="evaluate")
    metadata = evaluate_module.read_metadata(export)
    evaluate_module.apply_evaluation(cfg, metadata, evaluate_module.command_line_keys())
    assert {k: cfg.eval[k] for k in expected} == expected


@pytest.mark.parametrize("named", [False, True])
def test_the_exports_base_model_wins_unless_the_user_names_one(
    named, make_cfg, monkeypatch, tmp_path
):
    """A LoRA trained on tiny_sd (base_model/ beside it) is not applied to evaluate's default
    model (toy_sd), only to one named on the command line."""
    export = _fake_export(tmp_path / "export", _recorded(tmp_path))
    _fake_export(export / "base_model", {}, "StableDiffusionPipeline")
    toy_sd = ROOT / "models" / "toy" / "toy_sd"
    overrides = [f"model.pretrained={toy_sd}"] if named else []
    cfg = make_cfg(f"export_dir={export}", *overrides, config_name="evaluate")
    loaded = []

    class Loaded(Exception):
        pass

    def record_base(export_dir, base_model=None):
        loaded.append(base_model)
        raise Loaded

    monkeypatch.setattr(evaluate_module, "load_export", record_base)
    with pytest.raises(Loaded):
        evaluate_module.evaluate(cfg)
    assert loaded == [str(toy_sd) if named else str(export / "base_model")]
    assert cfg.model.name == ("toy_sd" if named else "tiny_sd")


@pytest.mark.parametrize(
    "model,overrides,match",
    [
        ("tiny_dit", [], "DiT \\(no evaluation\\): t2ilab measures class-conditional models only"),
        ("toy_dit_init", [], "DiT \\(no evaluation\\): use eval=toy_alignment"),
        ("toy_dit_init", ["eval=toy"], "the DreamBooth protocol needs text prompts"),
    ],
)
def test_a_class_conditional_export_without_its_protocol_is_refused(
    model, overrides, match, make_cfg, monkeypatch, tmp_path
):
    recorded = _recorded(
        tmp_path,
        artefact="pipeline",
        model={"name": model, "family": "dit", "resolution": 64},
        eval={**TINY_EVAL, "enabled": False},
    )
    export = _fake_export(tmp_path / "export", recorded, "DiTPipeline")
    monkeypatch.setattr(evaluate_module, "load_pipeline", _no_pipeline)
    cfg = make_cfg(f"export_dir={export}", *overrides, config_name="evaluate")
    with pytest.raises(UserError, match=match) as err:
        evaluate_module.evaluate(cfg)
    assert "\n" not in str(err.value)


def test_a_run_without_evaluation_says_how_to_name_one(make_cfg, monkeypatch, tmp_path):
    recorded = _recorded(tmp_path, artefact="pipeline", eval={**TINY_EVAL, "enabled": False})
    export = _fake_export(tmp_path / "export", recorded, "StableDiffusionPipeline")
    monkeypatch.setattr(evaluate_module, "load_pipeline", _no_pipeline)
    cfg = make_cfg(f"export_dir={export}", config_name="evaluate")
    with pytest.raises(UserError, match="without evaluation .*: name one, e.g. eval=dreambooth"):
        evaluate_module.evaluate(cfg)


def test_a_folder_without_a_record_renders_at_its_own_size(make_cfg):
    folder = ROOT / "models" / "toy" / "toy_pixart"  # 128 px; evaluate's default model is 64
    cfg = make_cfg(f"export_dir={folder}", config_name="evaluate")
    evaluate_module.apply_model(cfg, folder, {}, evaluate_module.command_line_keys())
    assert cfg.eval.resolution == 128


def _no_pipeline(*a, **k):
    raise AssertionError("the pipeline loaded before the input was checked")


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
        (lambda t: ["eval.prior_images=1"], "eval.prior_images=1"),
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


@pytest.mark.slow
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
