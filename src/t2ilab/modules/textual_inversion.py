"""Textual inversion (Gal et al. 2022): learn new token embeddings, everything else frozen.

Only the placeholder rows of the text encoder's input embedding change: after every optimizer
step all other rows are restored from a copy (as diffusers' textual_inversion.py does), so they
stay bitwise identical whatever the optimizer's weight decay does. Saved as
learned_embeds.safetensors ({placeholder: (num_vectors, dim)}), which stock
`pipe.load_textual_inversion(export)` loads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import save_file

from t2ilab.errors import UserError
from t2ilab.modules.parameter_efficient import ParameterEfficientModule


def placeholder_tokens(placeholder: str, num_vectors: int) -> list[str]:
    """diffusers' multi-vector naming: <tok>, <tok>_1, <tok>_2, ... (what load_textual_inversion
    creates and what pipelines expand a prompt's <tok> into)."""
    return [placeholder] + [f"{placeholder}_{i}" for i in range(1, num_vectors)]


def initializer_ids(tokenizer, word: str | None) -> list[int]:
    """The tokens the new embedding starts from: the initializer word's (by default the class
    noun). A word of several tokens ("teddy bear") starts from their mean embedding."""
    ids = tokenizer.encode(word or "", add_special_tokens=False)
    if not ids:
        raise UserError(
            f"method.initializer_token={word!r} gives no token to start from: set "
            "method.initializer_token=WORD (the class noun, e.g. dog) or data.class_noun"
        )
    return ids


class TextualInversionModule(ParameterEfficientModule):
    artefact = "textual_inversion"

    @classmethod
    def text_encoder_frozen(cls, method_cfg) -> bool:
        return False  # the placeholder's embedding rows train

    @classmethod
    def prepare_tokenizer(cls, tokenizer, method_cfg):
        placeholder, n = method_cfg.placeholder_token, int(method_cfg.num_vectors)
        if n < 1:
            raise UserError(f"method.num_vectors={n} must be >= 1")
        initializer_ids(tokenizer, method_cfg.initializer_token)
        tokens = placeholder_tokens(placeholder, n)
        # A placeholder that is already one token (a real word like "dog") would hijack it.
        existing = len(tokenizer.encode(placeholder, add_special_tokens=False)) == 1
        if existing or tokenizer.add_tokens(tokens) != n:
            raise UserError(
                f"method.placeholder_token={placeholder!r} is already in the vocabulary: pick a new "
                "string such as <my-dog>"
            )
        return lambda prompt: TextualInversionLoaderMixin()._maybe_convert_prompt(prompt, tokenizer)

    def __init__(
        self,
        unet,
        vae,
        text_encoder,
        tokenizer,
        scheduler_config,
        placeholder_token: str,
        initializer_token: str,
        num_vectors: int = 1,
        **base_kwargs,
    ):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler_config, **base_kwargs)
        self.placeholder_token = placeholder_token
        tokens = placeholder_tokens(placeholder_token, num_vectors)
        self.placeholder_ids = tokenizer.convert_tokens_to_ids(tokens)
        if any(i == tokenizer.unk_token_id for i in self.placeholder_ids):
            raise RuntimeError("prepare_tokenizer must add the placeholder tokens first")
        # The new rows are set from the initializer below: no need for transformers' mean resizing.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        embeddings = text_encoder.get_input_embeddings().weight
        init_ids = initializer_ids(tokenizer, initializer_token)
        with torch.no_grad():
            embeddings[self.placeholder_ids] = embeddings[init_ids].mean(dim=0)
        embeddings.requires_grad_(True)
        keep = torch.ones(embeddings.shape[0], dtype=torch.bool)
        keep[self.placeholder_ids] = False
        self.register_buffer("frozen_rows", keep, persistent=False)
        self.register_buffer("original_embeddings", embeddings.detach().clone(), persistent=False)

    def trained_parameter_count(self) -> int:
        return len(self.placeholder_ids) * self.text_encoder.get_input_embeddings().weight.shape[1]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Undo every change outside the placeholder rows (weight decay touches all rows).
        with torch.no_grad():
            weight = self.text_encoder.get_input_embeddings().weight
            weight[self.frozen_rows] = self.original_embeddings[self.frozen_rows]

    def learned_embeddings(self) -> torch.Tensor:
        return (
            self.text_encoder.get_input_embeddings().weight[self.placeholder_ids].detach().clone()
        )

    def save_weights(self, folder: Path) -> None:
        folder = Path(folder)
        save_file(
            {self.placeholder_token: self.learned_embeddings().float().cpu().contiguous()},
            folder / "learned_embeds.safetensors",
        )
