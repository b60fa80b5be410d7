"""SDXL as a backbone: the condition and prediction equal stock StableDiffusionXLPipeline's, a
folder with the real model's configs loads, and LoRA / textual-inversion exports load in stock
diffusers."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import CONF
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from omegaconf import OmegaConf
from real_shapes import reduced_sdxl_configs, sdxl_base_configs, write_sdxl_folder
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from t2ilab.models.export import apply_textual_inversion
from t2ilab.models.sdxl import (
    StableDiffusionXLBackbone,
    load_sdxl_components,
    second_tokenizer_ids,
)
from t2ilab.modules.lora import LoRAModule
from t2ilab.modules.textual_inversion import TextualInversionModule

LONG = " ".join(["a very long prompt about a small red toy robot on a wooden table"] * 8)
# "!" is tokenizer_2's pad token, and special: the stock tokenizer_2 makes every "!" id 0.
PROMPTS = [
    "a photo of sks dog",
    "",
    "a dog! on a beach!!",
    "what?! no... hi!?! (wow)!",
    "café au lait! 東京",
    LONG,
    "wow! " + LONG,
]


@pytest.fixture(scope="module")
def tiny_cfg():
    return OmegaConf.load(CONF / "model" / "tiny_sdxl.yaml")


@pytest.fixture(scope="module")
def backbone(tiny_cfg) -> StableDiffusionXLBackbone:
    return load_sdxl_components(tiny_cfg)


@pytest.fixture(scope="module")
def base_folder(backbone, tmp_path_factory):
    """The tiny model as a stock pipeline folder: what the stock loaders start from."""
    folder = tmp_path_factory.mktemp("tiny_sdxl")
    backbone.save_pipeline(folder, EulerDiscreteScheduler.from_config(backbone.scheduler_config))
    return folder


def stock_pipeline(folder) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(folder)


def token_ids(tokenizer, prompts):
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def latents_and_t(n, size=32, channels=4):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, channels, size, size, generator=g), torch.full((n,), 500)


def stock_unet_out(pipe, prompts, size=32, resolution=None):
    """The UNet output as the stock pipeline conditions it (no guidance); time ids for an
    uncropped image of `resolution` (default: the latents' size in pixels)."""
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
        r = resolution or size * pipe.vae_scale_factor
        time_ids = pipe._get_add_time_ids(
            (r, r), (0, 0), (r, r), embeds.dtype, pipe.text_encoder_2.config.projection_dim
        ).repeat(len(prompts), 1)
        x, t = latents_and_t(len(prompts), size)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return pipe.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample


def backbone_out(backbone, prompts, size=32):
    with torch.no_grad():
        condition = backbone.encode_condition({"input_ids": token_ids(backbone.tokenizer, prompts)})
        x, t = latents_and_t(len(prompts), size)
        return backbone.predict(x, t, condition)


def test_tiny_sdxl_builds_deterministically_and_encodes_both_encoders(tiny_cfg, backbone):
    again = load_sdxl_components(tiny_cfg)
    for name, module in backbone.modules().items():
        other = again.modules()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in module.state_dict().items()), name
        assert not module.training, name
    other_seed = OmegaConf.merge(tiny_cfg, {"tiny": {"seed": 1}})
    assert not torch.equal(
        load_sdxl_components(other_seed).unet.conv_in.weight, backbone.unet.conv_in.weight
    )
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    assert backbone.family == "sdxl" and backbone.part_names() == parts

    # tokenizer_2's own ids (padded with "!") equal those derived from tokenizer 1's.
    tokenizer, tokenizer_2 = backbone.tokenizer, backbone.tokenizer_2
    assert tokenizer_2.pad_token_id == 0 and tokenizer.pad_token_id == tokenizer.eos_token_id
    ids = token_ids(tokenizer, PROMPTS)
    derived = second_tokenizer_ids(ids, tokenizer, tokenizer_2)
    expected = token_ids(tokenizer_2, PROMPTS)
    assert torch.equal(derived, expected)
    assert (expected[2] == 0).sum() > (ids[2] == tokenizer.eos_token_id).sum()  # "!" -> 0
    # Truncated prompts: no padding; the second has one "!" (id 0).
    assert expected[-2].tolist().count(0) == 0 and expected[-1].tolist().count(0) == 1

    condition = backbone.encode_condition({"input_ids": ids})
    tiny = tiny_cfg.tiny
    width = tiny.text_encoder.hidden_size + tiny.text_encoder_2.hidden_size
    n = len(PROMPTS)
    assert condition["embeds"].shape == (n, 77, width) == (n, 77, tiny.unet.cross_attention_dim)
    assert condition["pooled"].shape == (n, tiny.text_encoder_2.projection_dim)
    assert condition["time_ids"].tolist() == [[64, 64, 0, 0, 64, 64]] * n
    assert not condition["embeds"].requires_grad  # frozen encoders: no graph


def test_model_tiny_sdxl_composes_with_its_cpu_budget(make_cfg):
    cfg = make_cfg("experiment=lora_dreambooth", "model=tiny_sdxl")
    assert cfg.model.family == "sdxl" and cfg.trainer.max_steps == 40  # conf/scale/tiny_sdxl
    real = make_cfg("experiment=lora_dreambooth", "model=sdxl", "eval=dreambooth")
    assert real.model.resolution == 1024 and real.trainer.max_steps != 40


def test_condition_and_prediction_equal_the_stock_pipeline(backbone, base_folder):
    pipe = stock_pipeline(base_folder)
    assert pipe.config.force_zeros_for_empty_prompt is True
    ids = token_ids(backbone.tokenizer, PROMPTS)
    ours = backbone.encode_condition({"input_ids": ids})
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    torch.testing.assert_close(ours["embeds"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=1e-6)
    given = {"input_ids": ids, "input_ids_2": token_ids(backbone.tokenizer_2, PROMPTS)}
    torch.testing.assert_close(
        backbone.encode_condition(given)["embeds"], embeds, rtol=0, atol=1e-6
    )

    # Micro-conditioning: the batch's sizes and crops, as the pipeline's own time ids.
    projection = pipe.text_encoder_2.config.projection_dim
    batch = {
        "input_ids": ids[:2],
        "original_size": torch.tensor([[128, 96], [40, 72]]),
        "crop_top_left": torch.tensor([[4, 8], [0, 2]]),
    }
    time_ids = backbone.encode_condition(batch)["time_ids"]
    for row, (size, crop) in enumerate((((128, 96), (4, 8)), ((40, 72), (0, 2)))):
        expected = pipe._get_add_time_ids(size, crop, (64, 64), torch.float32, projection)
        assert torch.equal(time_ids[row : row + 1], expected)

    # What the stock pipeline feeds its UNet while sampling, and what comes out, equal ours.
    calls = []
    pipe.unet.register_forward_hook(
        lambda m, args, kwargs, out: calls.append((args, kwargs, out[0])), with_kwargs=True
    )
    pipe(
        PROMPTS[0],
        num_inference_steps=1,
        guidance_scale=1.0,
        height=64,
        width=64,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    )
    (x, t), kwargs, out = calls[0]
    condition = backbone.encode_condition({"input_ids": ids[:1]})
    torch.testing.assert_close(
        kwargs["encoder_hidden_states"], condition["embeds"], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["time_ids"], condition["time_ids"])
    with torch.no_grad():
        torch.testing.assert_close(backbone.predict(x, t, condition), out, rtol=0, atol=1e-5)


def test_a_folder_with_the_real_configs_loads_and_runs(tmp_path):
    from t2ilab.models.loading import load_components, vae_scale_factor

    folder = write_sdxl_folder(tmp_path / "sdxl")
    cfg = {"name": "sdxl", "family": "sdxl", "pretrained": str(folder), "resolution": 1024}
    backbone = load_components(cfg)  # the dispatch train.py uses
    assert isinstance(backbone, StableDiffusionXLBackbone) and vae_scale_factor(cfg) == 8
    classes = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    real, reduced = sdxl_base_configs(), reduced_sdxl_configs()
    for name, cls in classes.items():
        module = getattr(backbone, name)
        assert type(module) is cls and not module.training, name
        config = module.config if hasattr(module.config, "keys") else module.config.to_dict()
        for key in set(real[name]) - {"architectures"}:  # every key of the real config ...
            value = config[key]
            value = list(value) if isinstance(value, tuple) else value
            assert value == reduced[name][key], (name, key)  # ... as the reduced one sets it
    assert backbone.scheduler_config["_class_name"] == "EulerDiscreteScheduler"
    assert backbone.tokenizer_2.pad_token_id == 0 and backbone.force_zeros_for_empty_prompt
    assert backbone.resolution == 1024

    # A step's condition and prediction at a reduced 64 px (8 x 8 latents).
    batch = {
        "input_ids": token_ids(backbone.tokenizer, PROMPTS[:2]),
        "original_size": torch.tensor([[1024, 1024], [768, 1344]]),
        "crop_top_left": torch.tensor([[0, 0], [0, 160]]),
    }
    with torch.no_grad():
        condition = backbone.encode_condition(batch)
        assert condition["embeds"].shape == (2, 77, reduced["unet"]["cross_attention_dim"])
        assert condition["pooled"].shape == (2, reduced["text_encoder_2"]["projection_dim"])
        x, t = latents_and_t(2, size=8)
        out = backbone.predict(x, t, condition)
    assert out.shape == x.shape and torch.isfinite(out).all()
    # The stock pipeline over the same folder (CLIP's legacy eos_token_id 2 pooling) agrees.
    stock = stock_unet_out(stock_pipeline(folder), PROMPTS[1:3], size=8, resolution=1024)
    torch.testing.assert_close(
        backbone_out(backbone, PROMPTS[1:3], size=8), stock, rtol=0, atol=1e-5
    )


def perturb(module, pattern):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if pattern in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_lora_export_loads_with_the_stock_loader(backbone, base_folder, tmp_path):
    module = LoRAModule(
        copy.deepcopy(backbone),
        rank=4,
        train_text_encoder=True,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    trained = [n for n, p in module.named_parameters() if p.requires_grad]
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        assert any(n.startswith(part) and "lora_" in n for n in trained), part
    # One step trains every adapter through the backbone's condition (text LoRA gets gradients).
    g = torch.Generator().manual_seed(0)
    ids = token_ids(backbone.tokenizer, ["a photo of sks dog!"] * 2)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "input_ids": ids}
    optimizer = module.configure_optimizers()
    module.train()
    module.diffusion_loss(batch)[0].backward()
    for part in ("unet.", "text_encoder.", "text_encoder_2."):
        grads = [
            p.grad for n, p in module.named_parameters() if n.startswith(part) and p.requires_grad
        ]
        assert any(grad is not None and grad.abs().sum() > 0 for grad in grads), part
    optimizer.step()
    module.eval()
    perturb(module, "lora_")  # lora_B starts at zero: make every adapter matter
    module.save_weights(tmp_path)
    keys = load_file(tmp_path / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}

    pipe = stock_pipeline(base_folder)
    without = stock_unet_out(pipe, PROMPTS[:2])
    pipe.load_lora_weights(tmp_path)  # stock diffusers, nothing of ours
    ours = backbone_out(module.backbone, PROMPTS[:2])
    torch.testing.assert_close(stock_unet_out(pipe, PROMPTS[:2]), ours, rtol=0, atol=1e-5)
    assert not torch.allclose(without, ours, atol=1e-3)


def test_textual_inversion_export_loads_on_both_encoders(backbone, base_folder, tmp_path):
    c = copy.deepcopy(backbone)
    method = OmegaConf.create(
        {"placeholder_token": "<toy-x>", "initializer_token": "toy", "num_vectors": 2}
    )
    transform = TextualInversionModule.prepare_tokenizer(c.tokenizer, method)
    module = TextualInversionModule(
        c,
        placeholder_token="<toy-x>",
        initializer_token="toy",
        num_vectors=2,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-1),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for encoder in c.text_encoders:
            rows = encoder.get_input_embeddings().weight[module.placeholder_ids]
            encoder.get_input_embeddings().weight[module.placeholder_ids] = rows + torch.randn(
                rows.shape, generator=g
            )
    module.save_weights(tmp_path)
    for file, encoder in (("learned_embeds", 0), ("learned_embeds_2", 1)):
        saved = load_file(tmp_path / f"{file}.safetensors")["<toy-x>"]
        assert torch.equal(saved, module.learned_embeddings(encoder))

    prompts = ["a photo of <toy-x> on a table", "a <toy-x>!"]
    ids = token_ids(c.tokenizer, [transform(p) for p in prompts])
    ours = c.encode_condition({"input_ids": ids})
    pipe = stock_pipeline(base_folder)
    apply_textual_inversion(pipe, tmp_path)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompts, device=torch.device("cpu"), do_classifier_free_guidance=False
        )
    torch.testing.assert_close(ours["embeds"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours["pooled"], pooled, rtol=0, atol=1e-6)
