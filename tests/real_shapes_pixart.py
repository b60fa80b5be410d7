"""PixArt-Sigma's real configs (PixArt-alpha/PixArt-Sigma-XL-2-1024-MS as diffusers has them) and
a reduced-width copy of them that keeps every key, so a pipeline folder with the real structure
and random weights builds in seconds, offline."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
)
from real_shapes import sdxl_base_configs
from transformers import T5Config, T5EncoderModel, T5Tokenizer

SIGMA_1024 = {
    # transformer/config.json
    "transformer": {
        "activation_fn": "gelu-approximate",
        "attention_bias": True,
        "attention_head_dim": 72,
        "attention_type": "default",
        "caption_channels": 4096,
        "cross_attention_dim": 1152,
        "dropout": 0.0,
        "in_channels": 4,
        "interpolation_scale": 2,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "norm_num_groups": 32,
        "norm_type": "ada_norm_single",
        "num_attention_heads": 16,
        "num_embeds_ada_norm": 1000,
        "num_layers": 28,
        "out_channels": 8,
        "patch_size": 2,
        "sample_size": 128,
        "upcast_attention": False,
        "use_additional_conditions": False,
    },
    # text_encoder/config.json: the encoder of T5 v1.1 XXL
    "text_encoder": {
        "architectures": ["T5EncoderModel"],
        "classifier_dropout": 0.0,
        "d_ff": 10240,
        "d_kv": 64,
        "d_model": 4096,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-6,
        "model_type": "t5",
        "num_decoder_layers": 24,
        "num_heads": 64,
        "num_layers": 24,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": 32,
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": 32128,
    },
    # vae/config.json: the SDXL VAE (Sigma trains over it)
    "vae": sdxl_base_configs()["vae"],
    # scheduler/scheduler_config.json
    "scheduler": {
        "algorithm_type": "dpmsolver++",
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "beta_start": 0.0001,
        "dynamic_thresholding_ratio": 0.995,
        "euler_at_final": False,
        "lambda_min_clipped": float("-inf"),
        "lower_order_final": True,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "solver_order": 2,
        "solver_type": "midpoint",
        "steps_offset": 0,
        "thresholding": False,
        "timestep_spacing": "linspace",
        "trained_betas": None,
        "use_karras_sigmas": False,
        "use_lu_lambdas": False,
        "variance_type": None,
    },
}

# PixArt-alpha/PixArt-Sigma-XL-2-512-MS holds transformer/ only: the 1024 one at 64 latents,
# interpolation_scale by Sigma's rule (sample_size / 64).
SIGMA_512_TRANSFORMER = dict(SIGMA_1024["transformer"], sample_size=64, interpolation_scale=1)

# Widths and depths only: every other key (patching, sample size, interpolation, norms,
# activations, VAE levels, scaling factor, vocabulary, schedule) stays the real one.
REDUCTIONS = {
    "transformer": {
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "cross_attention_dim": 16,  # = heads x head dim, as 1152 = 16 x 72
        "caption_channels": 32,  # = the T5 width
    },
    "text_encoder": {
        "d_model": 32,
        "d_ff": 64,
        "d_kv": 8,
        "num_heads": 4,
        "num_layers": 2,
        "num_decoder_layers": 2,
    },
    "vae": {"block_out_channels": [8, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 8},
}


def reduced(configs: dict = SIGMA_1024) -> dict:
    """The real configs with smaller widths and depths; the same keys."""
    out = copy.deepcopy(configs)
    for part, changes in REDUCTIONS.items():
        assert set(changes) <= set(out[part]), f"{part}: not a real key"
        out[part].update(changes)
    return out


def small_t5_tokenizer() -> T5Tokenizer:
    """transformers' T5Tokenizer (the class the real folder names) over a small unigram
    vocabulary in T5's layout (<pad> 0, </s> 1, <unk> 2, pieces, extra ids last): it needs no
    sentencepiece file, so it saves and reloads (AutoTokenizer) offline."""
    words = "a an the of on in red green blue yellow circle square star triangle photo".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + w, -1.0) for w in words] + [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5Tokenizer(vocab=vocab, model_max_length=300)


def write_sigma_folder(folder: Path, configs: dict | None = None, seed: int = 0) -> dict:
    """A PixArtSigmaPipeline folder with these configs and random weights; returns the configs."""
    configs = configs or reduced()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = PixArtSigmaPipeline(
            tokenizer=small_t5_tokenizer(),
            text_encoder=T5EncoderModel(T5Config(**configs["text_encoder"])).eval(),
            vae=AutoencoderKL(**configs["vae"]),
            transformer=PixArtTransformer2DModel(**configs["transformer"]),
            scheduler=DPMSolverMultistepScheduler(**configs["scheduler"]),
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return configs
