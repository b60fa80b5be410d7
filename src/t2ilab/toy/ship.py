"""Ship a trained toy pipeline without a second copy of the parts it shares.

`experiment=toy_pretrain_sd` (and the toy PixArt's stages) export a whole pipeline folder,
including copies of the frozen toy VAE, text encoder and tokenizer it was built over. In the
repository those subfolders become relative links to models/toy/toy_vae, toy_clip and
toy_sd/text_encoder, after checking that the export's copy is exactly the shipped one, so the
30 MB budget pays for them once and the pipeline still loads with stock diffusers. toy_sd's own
text encoder stays a copy: linked to the whole CLIPModel folder, `CLIPTextModel.from_pretrained`
would print a table of the image tower's "unexpected" weights at every load (a test checks the
copy equals toy_clip's tower); toy_pixart links to that copy.

With --run, the training run's record goes in too, as for the other toy models: training.json
(command, seed, steps, wall time, versions, and `quality.sd_quality` measured on the linked
folder; for a staged model every stage, found through model.init_from or a model.pretrained
that names a run's export; for a run stopped and
continued, every launch with its steps, wall time and command) and its last sample grid as
samples.png:

    python -m t2ilab.toy.ship models/toy/toy_sd --run logs/train/runs/<timestamp>
    python -m t2ilab.toy.ship models/toy/toy_pixart --run runs/toy_pixart/stage3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from t2ilab.callbacks.segments import total_wall_time_s


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise ValueError(f"{folder}: expected one .safetensors file, found {len(files)}")
    return load_file(files[0])


def _same_weights(copy: Path, shipped: Path) -> bool:
    own, source = _weights(copy), _weights(shipped)
    return own.keys() == source.keys() and all(torch.equal(v, source[k]) for k, v in own.items())


def _same_tokenizer(copy: Path, shipped: Path) -> bool:
    from transformers import AutoTokenizer

    a, b = AutoTokenizer.from_pretrained(copy), AutoTokenizer.from_pretrained(shipped)
    return a.get_vocab() == b.get_vocab() and a.model_max_length == b.model_max_length


def _link(subfolder: Path, target_name: str) -> None:
    shutil.rmtree(subfolder)
    os.symlink(Path("..") / target_name, subfolder, target_is_directory=True)


# export subfolder, the shipped folder (beside the export) it must equal, and how to compare
SHARED = (
    ("vae", "toy_vae", _same_weights),
    ("tokenizer", "toy_clip", _same_tokenizer),
    ("text_encoder", "toy_sd/text_encoder", _same_weights),
    # the toy Flux holds the same tower and tokenizer in T5's slots too
    ("tokenizer_2", "toy_clip", _same_tokenizer),
    ("text_encoder_2", "toy_sd/text_encoder", _same_weights),
)


def link_shared_parts(export: str | Path) -> list[str]:
    """Replace the export's copies of shipped toy parts with links; returns what was linked.
    Refuses (ValueError, nothing changed) when a copy differs from the shipped part."""
    export = Path(export)
    plan = []
    for sub, name, same in SHARED:
        copy, shipped = export / sub, export.parent / name
        if copy.is_symlink() or not copy.exists() or not shipped.exists():
            continue
        if shipped.resolve().is_relative_to(export.resolve()):
            continue  # the part is this export's own (toy_sd's text encoder)
        if not same(copy, shipped):
            raise ValueError(f"{copy} differs from {shipped}: the part was trained, not shared")
        plan.append((copy, name))
    for copy, name in plan:
        _link(copy, name)
    return [copy.name for copy, _ in plan]


def _run_record(run: Path) -> dict:
    import yaml

    results = json.loads((run / "results.json").read_text())
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    # Every launch of the run (first and continuations), when the run recorded them; a run
    # from before segments were recorded has its last launch's record only.
    segments = results.get("segments")
    wall_time = total_wall_time_s(segments) if segments else results["wall_time_s"]
    return {
        "run": str(run),
        "command": segments[-1]["command"]
        if segments
        else "python train.py " + " ".join(overrides),
        "seed": config.get("seed"),
        "steps": results["steps"],
        "train_wall_time_s": wall_time,
        "segments": segments,
        "metrics": results.get("metrics", {}),
        "init_from": _started_from(config.get("model") or {}),
    }


def _started_from(model: dict) -> str | None:
    """The earlier stage a run started from: model.init_from (PixArt's hand-over), or
    model.pretrained when that is another run's export (toy_sd's second stage)."""
    if model.get("init_from"):
        return model["init_from"]
    pretrained = model.get("pretrained")
    if pretrained and Path(pretrained).name == "export":
        if (Path(pretrained).parent / "results.json").is_file():
            return pretrained
    return None


def stage_records(run: Path) -> list[dict]:
    """The run and every earlier stage it started from (model.init_from, or model.pretrained
    naming a run's export), first stage first."""
    records, seen = [], set()
    while run is not None and run.resolve() not in seen:
        seen.add(run.resolve())
        record = _run_record(run)
        records.insert(0, record)
        init = record["init_from"]
        run = Path(init).parent if init and Path(init).name == "export" else init
        run = Path(run) if run else None
    return records


def _resolution(run: Path) -> int | None:
    import yaml

    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    return (config.get("model") or {}).get("resolution")


def record_run(export: Path, run: Path, **quality_kwargs) -> dict:
    """training.json + samples.png in `export`, from the run folder that trained it (and, for
    a staged model, the runs before it). `quality_kwargs` go to `quality.sd_quality` (n,
    steps: the defaults are what the shipped records hold)."""
    from t2ilab.toy import quality
    from t2ilab.toy.pretrain import GRID_NAME, versions
    from t2ilab.utils.atomic import write_json_atomic

    stages = stage_records(run)
    grids = sorted((run / "samples").glob("step_*.png"))
    if grids:
        shutil.copyfile(grids[-1], export / GRID_NAME)
    pipe = quality.load_scoring_pipeline(export)
    if "size" not in quality_kwargs:  # the training resolution (FluxPipeline's default is 1024)
        quality_kwargs["size"] = _resolution(run)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    last = stages[-1]
    summary = {
        "component": export.name,
        "command": last["command"],
        "seed": last["seed"],
        "eval_seed": quality.EVAL_SEED,
        "steps": sum(stage["steps"] for stage in stages),
        "train_wall_time_s": total_wall_time_s(stages, "train_wall_time_s"),
        "stages": stages if len(stages) > 1 else None,
        "parameters": sum(p.numel() for p in denoiser.parameters()),
        "metrics": {k: round(v, 4) for k, v in quality.sd_quality(pipe, **quality_kwargs).items()},
        "sample_grid": grids[-1].name if grids else None,
        "versions": versions(),
    }
    write_json_atomic(export / "training.json", summary)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export", type=Path, help="an exported pipeline folder in models/toy/")
    parser.add_argument("--run", type=Path, help="the run folder that trained it (its record)")
    args = parser.parse_args(argv)
    linked = link_shared_parts(args.export)
    print(f"{args.export}: linked {', '.join(linked) or 'nothing (already linked)'}")
    if args.run:
        summary = record_run(args.export, args.run)
        print(f"{args.export}/training.json: {summary['metrics']}")


if __name__ == "__main__":
    main()
