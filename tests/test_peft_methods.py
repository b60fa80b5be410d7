"""LoRA and textual inversion: what trains, and exports that stock diffusers loads."""

from __future__ import annotations

import copy

import pytest
import torch
from _support import CONF
from diffusers import StableDiffusionPipeline
from omegaconf import OmegaConf

from t2ilab.models.export import load_export
from t2ilab.models.loading import load_sd_components
from t2ilab.modules.lora import LoRAModule
from t2ilab.modules.textual_inversion import TextualInversionModule


@pytest.fixture(scope="module")
def components():
    return load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml"))


def _batch(tokenizer, prompt, n=2):
    ids = tokenizer(
        [prompt] * n, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    g = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.rand(n, 3, 64, 64, generator=g) * 2 - 1,
        "input_ids": ids,
        "num_instance": n,
    }


def _train(module, batch, steps=3):
    optimizer = module.configure_optimizers()
    module.train()
    for i in range(steps):
        loss, _ = module.diffusion_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        module.on_train_batch_end(None, batch, i)
    module.eval()


def _unet_out(unet, text_encoder, ids):
    torch.manual_seed(1)
    x, t = torch.randn(1, 4, 32, 32), torch.tensor([500])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=text_encoder(ids)[0]).sample


def make_lora(components, **kwargs):
    c = copy.deepcopy(components)
    return LoRAModule(
        c,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-2),
        **kwargs,
    )


def test_lora_trains_only_lora_weights(components):
    module = make_lora(components, rank=4)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(n.startswith("unet.") for n in names)
    before = {n: p.clone() for n, p in module.named_parameters() if not p.requires_grad}
    _train(module, _batch(module.tokenizer, "a photo of sks toy"))
    for n, p in module.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n


def test_lora_export_loads_in_stock_diffusers(components, tmp_path):
    from t2ilab.models.export import export_pipeline

    module = make_lora(components, rank=4, alpha=8, train_text_encoder=True)
    assert any("lora_" in n for n, p in module.text_encoder.named_parameters() if p.requires_grad)
    _train(module, _batch(module.tokenizer, "a photo of sks toy"))
    base = load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml"))
    export_pipeline(module, tmp_path / "export", base_components=base)
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").is_file()

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export" / "base_model")
    ids = module.tokenizer(
        ["a photo of sks toy"], padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    without = _unet_out(pipe.unet, pipe.text_encoder, ids)
    pipe.load_lora_weights(tmp_path / "export")  # stock diffusers, nothing of ours
    loaded = _unet_out(pipe.unet, pipe.text_encoder, ids)
    trained = _unet_out(module.unet, module.text_encoder, ids)
    torch.testing.assert_close(loaded, trained, rtol=1e-4, atol=1e-5)  # alpha/rank respected
    assert not torch.allclose(loaded, without, atol=1e-5)
    image = pipe("a photo of sks toy", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)
    # Our loader gives the same pipeline (base model, trained schedule, LoRA).
    ours = load_export(tmp_path / "export")
    torch.testing.assert_close(
        _unet_out(ours.unet, ours.text_encoder, ids), trained, rtol=1e-4, atol=1e-5
    )


def make_ti(components, num_vectors=2, weight_decay=0.1):
    c = copy.deepcopy(components)
    method = OmegaConf.create(
        {"placeholder_token": "<toy-x>", "initializer_token": "toy", "num_vectors": num_vectors}
    )
    transform = TextualInversionModule.prepare_tokenizer(c.tokenizer, method)
    module = TextualInversionModule(
        c,
        placeholder_token="<toy-x>",
        initializer_token="toy",
        num_vectors=num_vectors,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-1, weight_decay=weight_decay),
    )
    return module, transform


def test_textual_inversion_changes_only_the_new_rows(components):
    module, transform = make_ti(components)
    assert transform("a photo of <toy-x> toy") == "a photo of <toy-x> <toy-x>_1 toy"
    weight = module.text_encoder.get_input_embeddings().weight
    before = weight.detach().clone()
    frozen = {n: p.clone() for n, p in module.named_parameters() if not p.requires_grad}
    _train(module, _batch(module.tokenizer, transform("a photo of <toy-x> toy")))
    after = module.text_encoder.get_input_embeddings().weight.detach()
    ids = module.placeholder_ids
    others = torch.ones(after.shape[0], dtype=torch.bool)
    others[ids] = False
    assert torch.equal(after[others], before[others])  # bitwise, despite weight decay
    assert not torch.equal(after[ids], before[ids])
    for n, p in module.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert module.trained_parameter_count() == 2 * after.shape[1]


def test_textual_inversion_export_loads_in_stock_diffusers(components, tmp_path):
    from t2ilab.models.export import export_pipeline

    module, transform = make_ti(components)
    _train(module, _batch(module.tokenizer, transform("a photo of <toy-x> toy")))
    base = load_sd_components(OmegaConf.load(CONF / "model" / "tiny_sd.yaml"))
    export_pipeline(module, tmp_path / "export", base_components=base)
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "export" / "base_model")
    pipe.load_textual_inversion(tmp_path / "export")  # stock diffusers
    ids = pipe.tokenizer.convert_tokens_to_ids(["<toy-x>", "<toy-x>_1"])
    loaded = pipe.text_encoder.get_input_embeddings().weight[ids]
    torch.testing.assert_close(loaded, module.learned_embeddings())
    image = pipe("a photo of <toy-x> toy", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_textual_inversion_rejects_bad_tokens(components):
    from t2ilab.errors import UserError

    c = copy.deepcopy(components)
    with pytest.raises(UserError, match="already in the vocabulary"):
        TextualInversionModule.prepare_tokenizer(
            c.tokenizer,
            OmegaConf.create(
                {"placeholder_token": "dog", "initializer_token": "toy", "num_vectors": 1}
            ),
        )
    with pytest.raises(UserError, match="gives no token to start from"):
        TextualInversionModule.prepare_tokenizer(
            c.tokenizer,
            OmegaConf.create(
                {"placeholder_token": "<n>", "initializer_token": "", "num_vectors": 1}
            ),
        )


def test_textual_inversion_starts_from_the_class_noun_by_default(make_cfg, components):
    """experiment=textual_inversion with the default subject (a striped star) on the toy model,
    whose tokenizer splits "toy" into three tokens: the new embedding starts from "star"."""
    from t2ilab.models.loading import load_tokenizer
    from t2ilab.modules.textual_inversion import initializer_ids

    cfg = make_cfg("experiment=textual_inversion", "model=toy_sd")
    assert cfg.method.initializer_token == cfg.data.class_noun == "star"
    assert len(initializer_ids(load_tokenizer(cfg.model), "star")) == 1
    # A word of several tokens starts from their mean embedding.
    c = copy.deepcopy(components)
    ids = initializer_ids(c.tokenizer, "a big toy")
    assert len(ids) == 3
    TextualInversionModule.prepare_tokenizer(
        c.tokenizer,
        OmegaConf.create(
            {"placeholder_token": "<n>", "initializer_token": "a big toy", "num_vectors": 1}
        ),
    )
    module = TextualInversionModule(
        c,
        placeholder_token="<n>",
        initializer_token="a big toy",
    )
    table = module.text_encoder.get_input_embeddings().weight
    torch.testing.assert_close(table[module.placeholder_ids[0]], table[ids].mean(dim=0))


@pytest.mark.parametrize(
    "experiment,artefact",
    [
        ("lora_dreambooth", "pytorch_lora_weights.safetensors"),
        ("textual_inversion", "learned_embeds.safetensors"),
        ("lora_finetune", "pytorch_lora_weights.safetensors"),
    ],
)
@pytest.mark.slow
def test_experiment_trains_and_exports(experiment, artefact, tmp_path):
    import json

    from _support import FAST, run_train

    run_dir = tmp_path / "run"
    proc = run_train([f"experiment={experiment}", *FAST, "trainer.max_steps=2"], run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = run_dir / "export"
    assert (export / artefact).is_file()
    metadata = json.loads((export / "t2ilab.json").read_text())
    if experiment == "lora_dreambooth":  # on the shipped toy_sd: the export names its folder
        assert not (export / "base_model").exists()
        assert metadata["base_model"] == "models/toy/toy_sd"  # relative to the project root
    else:  # a tiny base built from config has no folder: it is shipped alongside
        assert (export / "base_model" / "model_index.json").is_file()
    assert metadata["artefact"] in {"lora", "textual_inversion"}
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["steps"] == 2
    pipe = load_export(export)
    prompt = (
        "a photo of <t2ilab-subject> toy" if experiment == "textual_inversion" else "a red star"
    )
    assert pipe(prompt, num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)
    if experiment == "lora_finetune":
        assert list((run_dir / "samples").glob("step_*.png"))  # from the training captions
