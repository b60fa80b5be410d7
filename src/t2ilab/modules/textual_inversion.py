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
from t2ilab.models.families import Family
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


def embeddings_file(index: int) -> str:
    """learned_embeds.safetensors for the first text encoder, learned_embeds_2.safetensors for
    SDXL's second, as diffusers' SDXL textual-inversion example names them."""
    return "learned_embeds.safetensors" if index == 0 else f"learned_embeds_{index + 1}.safetensors"


class TextualInversionModule(ParameterEfficientModule):
    artefact = "textual_inversion"

    @classmethod
    def refusal(cls, family: Family, method_cfg) -> str | None:
        if not family.text:
            return (
                f"textual inversion learns a word; {family.description} has no text: use "
                "method=full or method=lora"
            )
        if not family.textual_inversion:
            return (
                f"textual inversion: {family.description} has no stock loader for learned "
                "embeddings; use method=lora or method=adapter"
            )
        return super().refusal(family, method_cfg)

    @classmethod
    def text_encoder_frozen(cls, method_cfg) -> bool:
        return False  # the placeholder's embedding rows train

    @classmethod
    def prepare_tokenizer(cls, tokenizer, method_cfg):
        placeholder, n = method_cfg.placeholder_token, int(method_cfg.num_vectors)
        if n < 1:
            raise UserError(f"method.num_vectors={n} must be >= 1")
        initializer_ids(tokenizer, method_cfg.initializer_token)
        add_placeholder(tokenizer, placeholder, n)
        return lambda prompt: TextualInversionLoaderMixin()._maybe_convert_prompt(prompt, tokenizer)

    def __init__(
        self,
        backbone,
        placeholder_token: str,
        initializer_token: str,
        num_vectors: int = 1,
        **kw,
    ):
        super().__init__(backbone, **kw)
        self.placeholder_token = placeholder_token
        tokens = placeholder_tokens(placeholder_token, num_vectors)
        first = backbone.tokenizers[0]
        self.placeholder_ids = first.convert_tokens_to_ids(tokens)
        if any(i == first.unk_token_id for i in self.placeholder_ids):
            raise RuntimeError("prepare_tokenizer must add the placeholder tokens first")
        for index, (encoder, tokenizer) in enumerate(backbone.embedding_encoders):
            if index:  # SDXL's second tokenizer: the same new tokens, at the same ids
                add_placeholder(tokenizer, placeholder_token, num_vectors)
                if tokenizer.convert_tokens_to_ids(tokens) != self.placeholder_ids:
                    raise RuntimeError("the text encoders' tokenizers gave the tokens other ids")
            # The new rows are set from the initializer below: no mean resizing needed.
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embeddings = encoder.get_input_embeddings().weight
            init_ids = initializer_ids(tokenizer, initializer_token)
            with torch.no_grad():
                embeddings[self.placeholder_ids] = embeddings[init_ids].mean(dim=0)
            embeddings.requires_grad_(True)
            self.register_buffer(
                f"original_embeddings_{index}", embeddings.detach().clone(), persistent=False
            )
        keep = torch.ones(len(first), dtype=torch.bool)
        keep[self.placeholder_ids] = False
        self.register_buffer("frozen_rows", keep, persistent=False)

    def trained_parts(self) -> set[str]:
        return set()  # only embedding rows train: the text encoders stay in eval mode

    def trained_parameter_count(self) -> int:
        return len(self.placeholder_ids) * sum(
            e.get_input_embeddings().weight.shape[1] for e, _ in self.backbone.embedding_encoders
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        # Undo every change outside the placeholder rows (weight decay touches all rows).
        with torch.no_grad():
            for index, (encoder, _) in enumerate(self.backbone.embedding_encoders):
                weight = encoder.get_input_embeddings().weight
                original = getattr(self, f"original_embeddings_{index}")
                weight[self.frozen_rows] = original[self.frozen_rows]

    def learned_embeddings(self, index: int = 0) -> torch.Tensor:
        weight = self.backbone.embedding_encoders[index][0].get_input_embeddings().weight
        return weight[self.placeholder_ids].detach().clone()

    def save_weights(self, folder: Path) -> None:
        for index in range(len(self.backbone.embedding_encoders)):
            save_file(
                {self.placeholder_token: self.learned_embeddings(index).float().cpu().contiguous()},
                Path(folder) / embeddings_file(index),
            )


def add_placeholder(tokenizer, placeholder: str, n: int) -> None:
    """Add the placeholder's tokens; a string that is already a token (a real word like "dog")
    would hijack it, so it is refused."""
    tokens = placeholder_tokens(placeholder, n)
    existing = len(tokenizer.encode(placeholder, add_special_tokens=False)) == 1
    if existing or tokenizer.add_tokens(tokens) != n:
        raise UserError(
            f"method.placeholder_token={placeholder!r} is already in the vocabulary: pick a new "
            "string such as <my-dog>"
        )
