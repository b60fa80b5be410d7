"""The shipped toy models (models/toy/) load where the real ones do and are as good as
experiments/toy_world/README.md says, on renders of a seed no recipe trained on; and the recipe
entry point (pretrain_toy.py) runs end to end and never overwrites a model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from t2ilab.toy import quality
from t2ilab.toy.tokenizer import RARE_IDENTIFIERS, WORLD_WORDS
from t2ilab.toy.world import (
    SUBJECTS,
    class_caption,
    dense_caption,
    sample_scene,
    scene_at,
    subject_scenes,
)

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "models" / "toy"
VAE_DIR, CLIP_DIR, DINO_DIR, SD_DIR, PIXART_DIR, FLUX_DIR = (
    TOY / name for name in ("toy_vae", "toy_clip", "toy_dino", "toy_sd", "toy_pixart", "toy_flux")
)
# Fresh renders: the recipes train on seeds 0-2 and report on 1000.
SEED = 4242
# Subject round trips through toy_vae, scored by toy_dino against the instance images: 0.77-0.83
# measured on this seed (0.52 for the striped star with the first toy_vae and toy_dino).
ROUND_TRIP_FLOOR = 0.7
# The ids the shipped tokenizer gives the DreamBooth identifiers (the last before the specials).
RARE_IDS = {"sks": 957, "zwx": 958, "qpv": 959, "vkb": 960}


@pytest.fixture(autouse=True, scope="module")
def _threads():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(VAE_DIR).eval()


@pytest.fixture(scope="module")
def clip():
    from t2ilab.metrics.embedders import ClipEmbedder

    return ClipEmbedder.from_pretrained(CLIP_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def dino():
    from t2ilab.metrics.embedders import DinoEmbedder

    return DinoEmbedder.from_pretrained(DINO_DIR, local_files_only=True)


# --- the folders -----------------------------------------------------------------------------


def test_folders_fit_the_size_budget_in_float32():
    """Every file under models/toy/ counted once (toy_sd's, toy_pixart's and toy_flux's links to
    the shared parts are not copies): at most 60 MB (issue 16's budget), all weights float32."""
    weight_folders = (VAE_DIR, CLIP_DIR, DINO_DIR, SD_DIR / "unet", SD_DIR / "text_encoder")
    for folder in (*weight_folders, PIXART_DIR / "transformer", FLUX_DIR / "transformer"):
        weights = list(folder.glob("*.safetensors"))
        assert len(weights) == 1, folder
        with safe_open(weights[0], framework="pt") as f:
            # float weights in float32; BatchNorm's batch counters are int64
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
            assert dtypes - {"I64"} == {"F32"}, folder
    for folder in (VAE_DIR, CLIP_DIR, DINO_DIR, SD_DIR, PIXART_DIR, FLUX_DIR):
        summary = json.loads((folder / "training.json").read_text())
        assert summary["metrics"] and summary["steps"] > 0
        assert (folder / "samples.png").is_file()
    assert (SD_DIR / "vae").is_symlink() and (SD_DIR / "tokenizer").is_symlink()
    assert all((PIXART_DIR / sub).is_symlink() for sub in ("vae", "tokenizer", "text_encoder"))
    flux_links = ("vae", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    assert all((FLUX_DIR / sub).is_symlink() for sub in flux_links)
    # os.walk does not follow the links, so each file counts once
    files = [Path(root) / name for root, _, names in os.walk(TOY) for name in names]
    total = sum(p.stat().st_size for p in files)
    assert total <= 60 * 2**20, total


# --- toy_vae ---------------------------------------------------------------------------------


def test_vae_reconstructs_fresh_renders(vae):
    assert vae.config.latent_channels == 4
    assert len(vae.config.block_out_channels) == 3  # 64x64 -> 16x16
    metrics = quality.vae_quality(vae, SEED, n=64)
    # measured on the shipped VAE: see experiments/toy_world/README.md
    # on this seed: 30.4 and 24.9 dB (the first toy_vae, before its decoder's second recipe:
    # 28.5 and 23.5 on seed 1000)
    assert metrics["psnr"] >= 29.5, metrics
    assert metrics["subject_psnr"] >= 24.3, metrics  # fine two-colour stripes are the hardest
    # scaling_factor makes the latents unit-variance, as SD's 0.18215 does
    assert abs(metrics["latent_std"] - 1.0) < 0.1, metrics
    assert abs(metrics["latent_mean"]) < 0.5, metrics
    with torch.no_grad():
        images = quality.render_batch([scene_at(SEED, i) for i in range(2)])
        assert vae.encode(images).latent_dist.mode().shape == (2, 4, 16, 16)


# --- toy_clip --------------------------------------------------------------------------------


def test_clip_zero_shot_and_retrieval(clip):
    metrics = quality.clip_quality(clip, SEED, n=256, batch=32)
    # chance: shape 1/8, colour 1/11, retrieval 1/32. Measured on this seed: colour 0.88,
    # retrieval 0.97/0.98, shape in caption 0.55, bare "a star" prompts 0.21 (the small ViT
    # tower is weak on shape; experiments/toy_world/README.md says what that means).
    assert metrics["color_acc"] >= 0.8, metrics
    assert metrics["retrieval_i2t_top1"] >= 0.9, metrics
    assert metrics["retrieval_t2i_top1"] >= 0.9, metrics
    assert metrics["shape_in_caption_acc"] >= 0.4, metrics


def test_clip_text_tower_loads_alone(clip):
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(CLIP_DIR).eval()
    full = clip.model.text_model.state_dict()
    own = getattr(text, "text_model", text).state_dict()  # transformers 4 wraps it, 5 not
    assert own.keys() == full.keys()
    assert all(torch.equal(own[k], full[k]) for k in own)
    tokens = clip.tokenizer(["a sks star on a gray background"], padding="max_length")
    states = text(input_ids=torch.tensor(tokens["input_ids"])).last_hidden_state
    assert states.shape == (1, clip.tokenizer.model_max_length, text.config.hidden_size)


def test_clip_image_processor_matches_training_normalisation(clip):
    """The saved CLIPImageProcessor (PIL path, no torchvision) and the torch fallback give the
    same pixels for 64x64 renders, so the metric sees what the model trained on."""
    assert clip.image_processor is not None
    images = quality.to_unit(quality.render_batch([scene_at(SEED, i) for i in range(4)]))
    processed = clip._pixel_values(images)
    assert torch.allclose(processed, clip._fallback(images), atol=1e-5)


def _tokens(tokenizer, text: str) -> list[str]:
    return tokenizer.tokenize(text)


def test_tokenizer_every_world_word_is_one_token():
    from transformers import AutoTokenizer, CLIPTokenizer

    for loader in (AutoTokenizer, CLIPTokenizer):
        tokenizer = loader.from_pretrained(CLIP_DIR)
        assert tokenizer.model_max_length == 32
        for word in WORLD_WORDS:
            assert _tokens(tokenizer, word) == [word + "</w>"], word
        # unknown words still tokenize (byte-level characters), as in CLIP
        assert "".join(_tokens(tokenizer, "xylophone")).replace("</w>", "") == "xylophone"


def test_tokenizer_covers_captions_and_prompts():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CLIP_DIR)
    rng = __import__("numpy").random.default_rng(SEED)
    captions = {dense_caption(sample_scene(rng)) for _ in range(500)}
    captions |= {dense_caption(s.base) for s in SUBJECTS.values()}
    words = {w for c in captions for w in c.replace(",", " ").split()}
    assert all(len(_tokens(tokenizer, w)) == 1 for w in words)
    eval_cfg = yaml.safe_load((ROOT / "conf" / "eval" / "dreambooth.yaml").read_text())
    toy_cfg = yaml.safe_load((ROOT / "conf" / "eval" / "toy.yaml").read_text())
    templates = eval_cfg["object_prompts"] + eval_cfg["live_subject_prompts"] + toy_cfg["prompts"]
    prompts = [t.format(identifier="sks", class_noun="hexagon") for t in templates]
    prompts += [f"{p}, with white dots on a gray background" for p in prompts]
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        assert len(ids) <= tokenizer.model_max_length, prompt
        words = prompt.lower().replace(",", " ").split()
        assert all(len(_tokens(tokenizer, w)) == 1 for w in words), prompt


def test_rare_identifiers_are_single_unseen_tokens():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CLIP_DIR)
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == len(tokenizer) - 1
    for word in RARE_IDENTIFIERS:
        assert tokenizer(word, add_special_tokens=False).input_ids == [RARE_IDS[word]]
    # never in a caption of the world (the CLIP recipe trains on dense and partial captions)
    seen: set[str] = set()
    for i in range(5000):
        scene = scene_at(0, i)
        seen.update(dense_caption(scene).replace(",", " ").split())
        seen.update(class_caption(scene).split())
    assert seen and not seen & set(RARE_IDENTIFIERS)
    ids = {i for w in seen for i in tokenizer(w, add_special_tokens=False).input_ids}
    assert not ids & set(RARE_IDS.values())


def test_plain_is_a_world_word_no_caption_says():
    """A plain object's caption leaves its pattern out, so "plain" is one token of the vocabulary
    that no training caption contains: as untrained as "sks". The identifier study's common-word
    arms are words the captions do use ("red", "large"), whose prior the subject must overcome."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CLIP_DIR)
    assert _tokens(tokenizer, "plain") == ["plain</w>"]
    counts: dict[str, int] = {}
    for i in range(5000):
        scene = scene_at(0, i)
        for caption in (dense_caption(scene), class_caption(scene)):
            for word in caption.replace(",", " ").split():
                counts[word] = counts.get(word, 0) + 1
    assert "plain" not in counts
    assert counts["red"] > 100 and counts["large"] > 1000


# --- toy_dino --------------------------------------------------------------------------------


def test_dino_is_sensitive_to_the_object_not_its_placement(dino):
    """Like DINO, it tells instances apart (its nearest other object is rarely of the same
    shape: knn_shape_acc is reported, not asserted); placement barely moves it."""
    assert dino.image_processor is not None
    metrics = quality.dino_quality(dino, SEED, n=128)
    # two views of one object vs two different objects (cosine of CLS tokens)
    assert metrics["same_object_cos"] > metrics["different_object_cos"] + 0.3, metrics
    assert metrics["object_top1"] >= 0.5, metrics  # chance 1/128; 0.75 measured on this seed
    # a subject's instance images resemble each other more than the subject without its
    # unique feature, and much more than other objects
    assert metrics["subject_same_cos"] > metrics["subject_lookalike_cos"], metrics
    assert metrics["subject_lookalike_cos"] > metrics["subject_other_cos"], metrics
    # blur and lower resolution (a decoder's softness) move it less than a missing detail does
    assert metrics["subject_softened_cos"] > metrics["subject_lookalike_cos"] + 0.2, metrics


def test_the_subject_through_the_vae_is_still_the_subject(vae, dino):
    """DreamBooth's DINO can only be as high as the subject survives the VAE: new poses of each
    subject, encoded and decoded by the shipped toy_vae, against its instance images. With the
    first toy_vae and toy_dino the striped star's round trips scored 0.52 (issue 16)."""
    for subject in SUBJECTS.values():
        instances = quality._embed(dino, subject_scenes(subject, 6))
        poses = quality.render_batch(subject_scenes(subject, 16, seed=SEED))
        with torch.no_grad():
            decoded = vae.decode(vae.encode(poses).latent_dist.mode()).sample.clamp(-1, 1)
        round_trips = quality._unit(dino.embed_images(quality.to_unit(decoded)))
        assert float((round_trips @ instances.T).mean()) >= ROUND_TRIP_FLOOR, subject.name


# --- the recipe entry point ------------------------------------------------------------------

TINY_VAE = [
    "toy_component=vae",
    "toy_component.steps=2",
    "toy_component.batch_size=2",
    "toy_component.num_workers=0",
    "toy_component.module.vae.block_out_channels=[8,8,8]",
    "toy_component.module.vae.norm_num_groups=4",
    "+toy_component.module.scale_images=8",
]


def _pretrain(args: list[str], run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "pretrain_toy.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_recipe_smoke_and_no_overwrite(tmp_path):
    from diffusers import AutoencoderKL

    out = tmp_path / "toy_vae"
    done = _pretrain([*TINY_VAE, f"out_dir={out}"], tmp_path / "run1")
    assert done.returncode == 0, done.stderr[-3000:]
    vae = AutoencoderKL.from_pretrained(out)
    assert vae.config.block_out_channels == [8, 8, 8]
    summary = json.loads((out / "training.json").read_text())
    assert summary["steps"] == 2 and summary["seed"] == 0 and "psnr" in summary["metrics"]
    assert (out / "samples.png").is_file()
    assert (tmp_path / "run1" / "training.json").is_file()
    assert (tmp_path / "run1" / "checkpoints" / "last.ckpt").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    refused = _pretrain([*TINY_VAE, f"out_dir={out}"], tmp_path / "run2")
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("t2ilab: error: ")
    assert "overwrite=true" in refused.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    # Continued to 4 steps: training.json records both launches, in order, with their commands.
    more = [*TINY_VAE, "toy_component.steps=4", f"out_dir={out}", "overwrite=true"]
    resumed = _pretrain([*more, "ckpt_path=last"], tmp_path / "run1")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads((out / "training.json").read_text())
    first, second = summary["segments"]
    assert (first["from_step"], first["to_step"]) == (0, 2)
    assert (second["from_step"], second["to_step"]) == (2, 4) and summary["steps"] == 4
    assert "ckpt_path" not in first["command"] and "ckpt_path=last" in second["command"]
    assert summary["command"] == second["command"]
    assert summary["train_wall_time_s"] == pytest.approx(
        first["wall_time_s"] + second["wall_time_s"], abs=0.11
    )


@pytest.mark.slow
def test_decoder_finetune_keeps_the_latent_space(tmp_path):
    """toy_component=vae_decoder trains the decoder of an existing VAE and nothing else: the
    encoder's weights and the scaling factor (the latent space the denoisers learnt) are
    unchanged, the decoder moved, and the base's training.json comes along."""
    from safetensors.torch import load_file

    base = tmp_path / "base"
    done = _pretrain([*TINY_VAE, f"out_dir={base}"], tmp_path / "run_base")
    assert done.returncode == 0, done.stderr[-3000:]
    tuned = tmp_path / "tuned"
    finetune = [
        "toy_component=vae_decoder",
        "toy_component.steps=3",
        "toy_component.batch_size=2",
        "toy_component.num_workers=0",
        f"toy_component.module.init_from={base}",
        "toy_component.module.lr=1e-2",
        f"out_dir={tuned}",
    ]
    done = _pretrain(finetune, tmp_path / "run_tuned")
    assert done.returncode == 0, done.stderr[-3000:]
    before = load_file(base / "diffusion_pytorch_model.safetensors")
    after = load_file(tuned / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    frozen = [k for k in before if not k.startswith(("decoder.", "post_quant_conv."))]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    config = lambda folder: json.loads((folder / "config.json").read_text())  # noqa: E731
    assert config(tuned)["scaling_factor"] == config(base)["scaling_factor"]
    assert "_name_or_path" not in config(tuned)  # no path of this machine in a shipped folder
    (base_summary,) = json.loads((tuned / "base_training.json").read_text())
    assert base_summary == json.loads((base / "training.json").read_text())
    # A second fine-tune lists both earlier records, newest first, in one flat list.
    kept = [a for a in finetune if not a.startswith(("toy_component.module.init_from", "out_dir"))]
    again = [*kept, f"toy_component.module.init_from={tuned}", f"out_dir={tmp_path / 'again'}"]
    done = _pretrain(again, tmp_path / "run_again")
    assert done.returncode == 0, done.stderr[-3000:]
    chain = json.loads((tmp_path / "again" / "base_training.json").read_text())
    assert chain == [json.loads((tuned / "training.json").read_text()), base_summary]


TINY_CLIP = [
    "toy_component=clip",
    "toy_component.steps=4",
    "toy_component.batch_size=4",
    "toy_component.num_workers=0",
    "toy_component.checkpoint_every=1",
    "toy_component.module.warmup_steps=1",
    "toy_component.module.text.hidden_size=16",
    "toy_component.module.text.intermediate_size=16",
    "toy_component.module.text.num_hidden_layers=1",
    "toy_component.module.vision.hidden_size=16",
    "toy_component.module.vision.intermediate_size=16",
    "toy_component.module.vision.num_hidden_layers=1",
    "toy_component.module.projection_dim=16",
]


@pytest.mark.slow
def test_a_stopped_recipe_continues_with_the_next_batch(tmp_path):
    """Stopped after 2 of 4 steps and continued, the recipe ends with the weights of an
    uninterrupted run, bit for bit: the loader goes on with batch 3, not batch 1 again, and the
    optimizer and LR schedule carry on (the contrastive step draws no random numbers)."""
    from safetensors.torch import load_file

    whole, halves = tmp_path / "whole", tmp_path / "halves"
    done = _pretrain([*TINY_CLIP, f"out_dir={whole}"], tmp_path / "run_whole")
    assert done.returncode == 0, done.stderr[-3000:]
    first = _pretrain([*TINY_CLIP, f"out_dir={halves}", "trainer.max_steps=2"], tmp_path / "run")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = _pretrain(
        [*TINY_CLIP, f"out_dir={halves}", "overwrite=true", "ckpt_path=last"], tmp_path / "run"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = load_file(whole / "model.safetensors")
    got = load_file(halves / "model.safetensors")
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    first_launch, second_launch = json.loads((halves / "training.json").read_text())["segments"]
    assert first_launch["to_step"] == 2 and second_launch["to_step"] == 4


# --- toy_sd ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_sd():
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(SD_DIR, safety_checker=None)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_sd_is_a_complete_pipeline_over_the_shipped_parts(toy_sd, clip):
    from transformers import CLIPTextModel

    assert toy_sd.vae.config.block_out_channels == [32, 32, 64]
    assert toy_sd.unet.config.cross_attention_dim == toy_sd.text_encoder.config.hidden_size
    # its text encoder is toy_clip's text tower, weight for weight
    tower = CLIPTextModel.from_pretrained(CLIP_DIR).state_dict()
    own = toy_sd.text_encoder.state_dict()
    assert own.keys() == tower.keys() and all(torch.equal(own[k], tower[k]) for k in own)
    assert toy_sd.tokenizer.get_vocab() == clip.tokenizer.get_vocab()
    image = toy_sd("a sks star", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


@pytest.mark.slow
def test_toy_sd_follows_the_colours_and_shape_of_a_prompt(toy_sd):
    """Read from the pixels, no model involved (quality's readers are exact on renders)."""
    metrics = quality.sd_quality(toy_sd, SEED, n=32)
    assert metrics["render_background_acc"] == metrics["render_object_color_acc"] == 1.0
    assert metrics["render_shape_acc"] == 1.0
    # The figures (issue 16). Chance: 1/11 for colours, 1/8 for shape. Measured on this
    # seed: background 1.0, object 0.97, shape 0.69 (the recipe's seed 1000, 64 prompts: 0.98,
    # 0.92, 0.73; seed 7, 128 prompts: 1.0, 0.98, 0.70). The first toy_sd drew blobs: shape
    # 0.09, background 0.22 (experiments/toy_world/README.md).
    assert metrics["object_color_acc"] >= 0.85, metrics
    assert metrics["background_acc"] >= 0.7, metrics
    assert metrics["shape_acc"] >= 0.6, metrics


# --- toy_pixart ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_pixart():
    from diffusers import DDIMScheduler, PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(PIXART_DIR)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_pixart_is_a_staged_pipeline_over_the_shipped_parts(toy_pixart, toy_sd):
    summary = json.loads((PIXART_DIR / "training.json").read_text())
    experiments = [stage["command"].split()[2] for stage in summary["stages"]]
    assert experiments == [f"experiment=toy_pixart_stage{i}" for i in (1, 2, 3)]
    # Each stage ran at least its recipe's steps (stage 1: one more, the step that exported it),
    # and the stage-1 DiT drew the labelled shape >= 0.8 of the time (its run's end-of-run
    # eval on 256 labels; issue 16's figure).
    for i, stage in enumerate(summary["stages"], start=1):
        recipe = ROOT / "conf" / "experiment" / f"toy_pixart_stage{i}.yaml"
        assert stage["steps"] >= yaml.safe_load(recipe.read_text())["trainer"]["max_steps"]
    assert summary["stages"][0]["metrics"]["shape_acc"] >= 0.8
    # the text encoder is toy_sd's (toy_clip's text tower), in T5's place
    own, sd = toy_pixart.text_encoder.state_dict(), toy_sd.text_encoder.state_dict()
    assert own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in own)
    config = toy_pixart.transformer.config
    assert config.caption_channels == toy_pixart.text_encoder.config.hidden_size
    assert config.sample_size == 32  # stage 3: 128 px over the 4x toy VAE
    image = toy_pixart("a sks star", num_inference_steps=2, max_sequence_length=32).images[0]
    assert image.size == (128, 128)


@pytest.mark.slow  # 45 s on one CPU thread (32 images at 128 px); CI runs it (README)
def test_toy_pixart_follows_the_colours_and_shapes_of_a_prompt(toy_pixart):
    """As for toy_sd: colours and shape read from the pixels; quality.read_shape is exact on
    renders."""
    metrics = quality.sd_quality(toy_pixart, SEED, n=32)
    assert min(v for k, v in metrics.items() if k.startswith("render_")) == 1.0
    # chance 1/11, 1/11, 1/8; measured on this seed: background 0.97, object 1.0, shape 0.78
    # (25 of 32; on 128 prompts of two seeds: experiments/toy_world/README.md). Issue 16's
    # figure for toy_pixart is shape >= 0.5; the floor here keeps the shipped model's own
    # level, with room for four images that another CPU's arithmetic draws differently.
    assert metrics["background_acc"] >= 0.9, metrics
    assert metrics["object_color_acc"] >= 0.9, metrics
    assert metrics["shape_acc"] >= 0.65, metrics


# --- toy_flux --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_flux():
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(FLUX_DIR)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_toy_flux_is_a_flow_pipeline_over_the_shipped_parts(toy_flux, toy_sd):
    summary = json.loads((FLUX_DIR / "training.json").read_text())
    assert summary["command"].split()[2:4] == ["experiment=toy_pretrain_sd", "model=toy_flux_init"]
    assert summary["train_wall_time_s"] <= 2.5 * 60 * 60  # the recipe's budget on 2 CPU cores
    assert type(toy_flux.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # toy_sd's text tower (toy_clip's) in both text slots: CLIP-L's pooled and T5's states
    sd = toy_sd.text_encoder.state_dict()
    for encoder in (toy_flux.text_encoder, toy_flux.text_encoder_2):
        own = encoder.state_dict()
        assert own.keys() == sd.keys() and all(torch.equal(own[k], sd[k]) for k in own)
    config = toy_flux.transformer.config
    assert config.joint_attention_dim == toy_flux.text_encoder.config.hidden_size
    assert not config.guidance_embeds
    image = toy_flux(
        "a sks star", height=64, width=64, num_inference_steps=2, max_sequence_length=32
    ).images[0]
    assert image.size == (64, 64)


@pytest.mark.slow  # about 20 s on one CPU thread (32 images at 64 px); CI runs it (README)
def test_toy_flux_follows_the_background_of_a_prompt(toy_flux):
    """Read from the pixels, as for toy_sd; the toy flow model samples without CFG."""
    metrics = quality.sd_quality(toy_flux, SEED, n=32, size=64)
    assert min(v for k, v in metrics.items() if k.startswith("render_")) == 1.0
    # chance 1/11; measured on this seed: background 0.84 (on the recipe's seed 1000: 0.66).
    assert metrics["background_acc"] >= 0.4, metrics
