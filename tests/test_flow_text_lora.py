"""LoRA on SD3's and Flux's text encoders (method.train_text_encoder=true): the CLIP encoders
their pipelines' LoRA loaders take get LoRA and train, T5 stays frozen, and the export loaded
with stock `load_lora_weights` encodes prompts exactly as the trained module does."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import CONF
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from omegaconf import OmegaConf
from safetensors.torch import load_file

from t2ilab.data.dreambooth import tokenize
from t2ilab.models.loading import load_components
from t2ilab.models.pipelines import make_sampler
from t2ilab.modules.lora import LoRAModule

# model -> (stock pipeline class, text encoders with LoRA, the frozen T5's name)
CASES = {
    "tiny_sd3": (StableDiffusion3Pipeline, ("text_encoder", "text_encoder_2"), "text_encoder_3"),
    "tiny_flux": (FluxPipeline, ("text_encoder",), "text_encoder_2"),
}
PROMPTS = ["a photo of sks dog!", "A red Star, on a beach."]


@pytest.mark.parametrize("model", CASES)
def test_text_lora_trains_the_clip_encoders_and_loads_in_the_stock_pipeline(model, tmp_path):
    pipeline_class, with_lora, t5 = CASES[model]
    backbone = load_components(OmegaConf.load(CONF / "model" / f"{model}.yaml"))
    backbone.save_pipeline(tmp_path / "base", make_sampler(None, backbone.scheduler_config))
    module = LoRAModule(
        copy.deepcopy(backbone),
        rank=4,
        train_text_encoder=True,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    trained = {n.split(".")[0] for n, p in module.named_parameters() if p.requires_grad}
    assert trained == {"transformer", *with_lora}  # T5 has no LoRA
    assert not any("lora_" in n for n, _ in getattr(module, t5).named_parameters())

    ids = torch.stack([tokenize(backbone.tokenizer, p) for p in PROMPTS])
    g = torch.Generator().manual_seed(0)
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "input_ids": ids}
    batch["prompt"] = PROMPTS
    module.train()
    module.diffusion_loss(batch)[0].backward()
    for name in with_lora:  # the text LoRA gets gradients through the condition
        grads = [p.grad for p in getattr(module, name).parameters() if p.requires_grad]
        assert any(grad is not None and grad.abs().sum() > 0 for grad in grads), name
    module.eval()
    with torch.no_grad():  # lora_B starts at zero: make every adapter matter
        for n, p in module.named_parameters():
            if "lora_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    module.save_weights(tmp_path / "lora")
    keys = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors").keys()
    assert {k.split(".")[0] for k in keys} == {"transformer", *with_lora}

    pipe = pipeline_class.from_pretrained(tmp_path / "base")
    length = backbone.tokenizer_2.model_max_length if model == "tiny_flux" else 77
    kwargs = {"max_sequence_length": length}
    if model == "tiny_sd3":
        kwargs.update(prompt_3=PROMPTS, do_classifier_free_guidance=False)
    with torch.no_grad():
        before = pipe.encode_prompt(PROMPTS, PROMPTS, **kwargs)
        pipe.load_lora_weights(tmp_path / "lora")  # stock diffusers, nothing of ours
        stock = pipe.encode_prompt(PROMPTS, PROMPTS, **kwargs)
        ours = module.backbone.cached_condition(module.backbone.encode_condition(batch))
    pooled = 2 if model == "tiny_sd3" else 1  # encode_prompt's tuple differs
    torch.testing.assert_close(stock[0], ours["prompt_embeds"], rtol=0, atol=1e-5)
    torch.testing.assert_close(stock[pooled], ours["pooled_prompt_embeds"], rtol=0, atol=1e-5)
    # The text LoRA acts (on Flux only through CLIP-L's pooled vector: T5's states are T5's).
    assert not torch.allclose(before[pooled], stock[pooled], atol=1e-4)
    assert torch.equal(before[0], stock[0]) == (model == "tiny_flux")
