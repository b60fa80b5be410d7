"""Dense captions for a folder of images with a vision-language model (PixArt-alpha, Chen et al.
2023, sec. 2.4: LLaVA asked to "Describe this image and its style in a very detailed manner").

    python -m t2ilab.data.captioning IMAGES_DIR [--model ID_OR_PATH] [--prompt ...]
        [--batch-size N] [--max-new-tokens N] [--out-dir DIR] [--overwrite] [--local-files-only]
        [--device cuda] [--dtype float16] [--config conf/caption.yaml]

Output: one `<image stem>.txt` per image, written into `out_dir` (default: the image folder
itself). With the default, the image folder becomes a captioned folder in the sidecar layout
(x.png + x.txt) that `t2ilab.data.captioned.read_captioned_folder` and `data=captioned` read.
With another `out_dir` only the .txt files go there, named like the images; copy them next to
the images to train on them. A folder that has a `metadata.jsonl` is refused as `out_dir`:
training would read that file and ignore the .txt captions.

Each caption is written (temp file + rename) as soon as its batch is done, so an interrupted run
keeps its work. Reruns resume: an image whose caption file exists and is not empty is skipped,
so a user's own captions are never replaced unless `overwrite=True`. Decoding is greedy, so the
same model, prompt and image always give the same caption.

No internet? Download the weights once (`hf download llava-hf/llava-1.5-7b-hf --local-dir DIR`)
and pass `--model DIR`.
"""

from __future__ import annotations

import argparse
import codecs
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from t2ilab.data.images import list_images, load_rgb, opened_image
from t2ilab.errors import UserError
from t2ilab.utils.atomic import write_text_atomic

log = logging.getLogger(__name__)

# t2ilab.data.captioned.METADATA_FILE; not imported from there, which pulls in Lightning.
METADATA_FILE = "metadata.jsonl"
DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT = "Describe this image and its style in a very detailed manner"
DEFAULT_BATCH_SIZE = 4
DEFAULT_MAX_NEW_TOKENS = 256
# The LLaVA-1.5 conversation format, for processors saved without a chat template.
FALLBACK_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"

_DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
}


# --- checks that need no model ------------------------------------------------------------------


def caption_path(image: Path, out_dir: Path) -> Path:
    """Where the caption of `image` goes: `out_dir/<image stem>.txt`."""
    return out_dir / f"{image.stem}.txt"


_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def _has_caption(path: Path) -> bool:
    """A caption file holding anything but a BOM and whitespace, in any encoding (an empty one
    would fail training anyway). Judged on the bytes, so a caption the user saved as UTF-16 or
    Windows-1252 is still theirs; an unreadable one is too: never replaced without overwrite."""
    if not path.is_file():
        return False
    try:
        data = path.read_bytes()
    except OSError:
        return True
    for bom in _BOMS:
        data = data.removeprefix(bom)
    return bool(data.strip(b" \t\r\n\x00"))


def _check_caption_targets(images: Sequence[Path], target: Path) -> None:
    """A folder or a broken link where a caption would go: writing would fail after the model
    loads (a folder) or replace the user's link, so it is an error now."""
    for image in images:
        path = caption_path(image, target)
        if (path.exists() or path.is_symlink()) and not path.is_file():
            raise UserError(
                f"{path} is in the way of the caption of {image.name}: it is a folder or a "
                "broken link, not a text file; move it away (or pass another out_dir) and rerun"
            )


def _check_folder(images_dir, out_dir) -> tuple[Path, Path, list[Path]]:
    if not images_dir:
        raise UserError("no image folder given: pass IMAGES_DIR, a folder of .jpg/.png/.webp files")
    folder = Path(images_dir).expanduser()
    if folder.is_file():
        raise UserError(f"image folder {images_dir} is a file: pass the folder that holds it")
    if not folder.is_dir():
        raise UserError(f"image folder {images_dir} does not exist: pass a folder of images")
    images = list_images(folder)
    if not images:
        raise UserError(f"image folder {images_dir} has no images: add .jpg/.png/.webp files to it")
    by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in by_stem:
            raise UserError(
                f"{by_stem[image.stem].name} and {image.name} in {images_dir} would share the "
                f"caption file {image.stem}.txt: rename one of them"
            )
        by_stem[image.stem] = image
    target = Path(out_dir).expanduser() if out_dir else folder
    if target.exists() and not target.is_dir():
        raise UserError(f"out_dir {out_dir} is a file: pass a folder for the .txt captions")
    if (target / METADATA_FILE).is_file():
        raise UserError(
            f"{target} has a {METADATA_FILE}, which training reads instead of .txt captions: "
            f"move it away or pass another out_dir"
        )
    _check_caption_targets(images, target)
    return folder, target, images


def _check_headers(images: Sequence[Path]) -> None:
    """Open (not decode) each image: cheap, and catches non-images before the model loads."""
    for path in images:
        with opened_image(path):  # a UserError naming the file if it cannot be read
            pass


def _check_settings(prompt: str, batch_size: int, max_new_tokens: int) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise UserError("prompt is empty: pass the instruction for the model, e.g. the default")
    if int(batch_size) < 1:
        raise UserError(f"batch_size={batch_size} must be at least 1")
    if int(max_new_tokens) < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be at least 1")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise UserError(f"device={device} is not a torch device: use cuda, cuda:1 or cpu") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device} but CUDA is not available: use device=cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16 on CUDA, fp32 elsewhere unless given."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise UserError(f"dtype={dtype} is not supported: use float16, bfloat16 or float32")
    return _DTYPES[key]


# --- model ----------------------------------------------------------------------------------------


def _looks_like_path(source: str) -> bool:
    """A hub id is `org/name`; anything else with path syntax is meant as a local folder."""
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or "\\" in source
        or source.count("/") > 1
        or Path(source).is_absolute()
    )


def _download_hint(source: str) -> str:
    repo = source if not _looks_like_path(source) and source.count("/") == 1 else DEFAULT_MODEL
    return (
        f"download it once with `hf download {repo} --local-dir DIR` "
        "and pass model=DIR (--model DIR)"
    )


def _reason(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    first = lines[0].strip() if lines else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return f"{err.__class__.__name__}: {first}" if first else err.__class__.__name__


def load_captioner(
    model_id_or_path: str | os.PathLike = DEFAULT_MODEL,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    local_files_only: bool = False,
):
    """(model, processor) of a LLaVA checkpoint (hub id or local folder), in eval mode on
    `device`; a one-line UserError naming how to get the weights when they cannot be loaded."""
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    source = str(model_id_or_path)
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(
                f"model={source} is a file, not a model folder: {_download_hint(source)}"
            )
        source = str(path)
    elif _looks_like_path(source):
        raise UserError(f"model={source} does not exist: {_download_hint(source)}")

    import transformers
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    except Exception as err:  # OSError offline/missing, ValueError bad id, hub/http errors
        where = "offline or not downloaded" if not path.exists() else "not a model folder"
        raise UserError(
            f"model {source} cannot be loaded ({where}; {_reason(err)}): {_download_hint(source)}"
        ) from err
    if config.model_type == "llava":
        model_class = LlavaForConditionalGeneration
    else:  # another vision-language model with a chat template (LLaVA-NeXT, Qwen2-VL, ...)
        model_class = getattr(transformers, "AutoModelForImageTextToText", None)
        if model_class is None:
            raise UserError(
                f"model {source} is a {config.model_type} model, not LLaVA: use a LLaVA "
                f"checkpoint such as {DEFAULT_MODEL}"
            )
    # transformers 5 renamed from_pretrained's `torch_dtype` to `dtype`.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local_files_only)
        model = model_class.from_pretrained(
            source, local_files_only=local_files_only, **{dtype_key: dtype}
        )
    except Exception as err:
        raise UserError(
            f"model {source} cannot be loaded ({_reason(err)}): {_download_hint(source)}"
        ) from err
    if getattr(processor, "image_processor", None) is None:
        raise UserError(
            f"model {source} has no image processor (preprocessor_config.json / "
            f"processor_config.json): it is not a complete vision-language model folder; "
            f"{_download_hint(source)}"
        )
    model.to(device).eval()
    return model, processor


def build_prompt(processor, prompt: str) -> str:
    """The text of one user turn holding an image and `prompt`, ready for generation: the
    processor's chat template when it has one, else LLaVA-1.5's `USER: <image>\\n... ASSISTANT:`."""
    if getattr(processor, "chat_template", None):
        conversation = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}
        ]
        return processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
    image_token = getattr(processor, "image_token", None) or "<image>"
    return FALLBACK_TEMPLATE.format(image=image_token, prompt=prompt)


def _prepare_tokenizer(processor) -> int | None:
    """Left padding (generation appends on the right); a pad token; returns its id."""
    tokenizer = getattr(processor, "tokenizer", processor)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.pad_token_id


@torch.inference_mode()
def generate_captions(
    model,
    processor,
    images: Sequence[Image.Image],
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> list[str]:
    """Greedy captions of a batch of PIL images: only the newly generated tokens, stripped."""
    pad_token_id = _prepare_tokenizer(processor)
    text = build_prompt(processor, prompt)
    inputs = processor(
        images=list(images), text=[text] * len(images), return_tensors="pt", padding=True
    )
    # Floating tensors (pixel_values) take the model's dtype; ids and masks only move.
    inputs = inputs.to(model.device, dtype=model.dtype)
    output = model.generate(
        **inputs,
        max_new_tokens=int(max_new_tokens),
        do_sample=False,
        num_beams=1,
        pad_token_id=pad_token_id,
    )
    new_tokens = output[:, inputs["input_ids"].shape[1] :]
    return [c.strip() for c in processor.batch_decode(new_tokens, skip_special_tokens=True)]


# --- the folder ----------------------------------------------------------------------------------


def caption_folder(
    images_dir: str | os.PathLike,
    model_id_or_path: str | os.PathLike = DEFAULT_MODEL,
    prompt: str = DEFAULT_PROMPT,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    out_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    local_files_only: bool = False,
    model=None,
    processor=None,
) -> dict[str, int]:
    """Caption every image of `images_dir` (top level, .jpg/.png/.webp) into
    `out_dir/<stem>.txt` (default out_dir: `images_dir`, see the module docstring).

    Images that already have a non-empty caption file are skipped unless `overwrite`. The
    folder is checked before any weights load. Pass `model` and `processor` to reuse loaded
    ones (then `model_id_or_path`, `dtype` and `local_files_only` are unused; `device`, when
    given, moves the model). Returns {"captioned", "skipped", "empty", "total"}: "empty"
    counts images whose generated caption was empty, which get no file (a warning names them).
    """
    _check_settings(prompt, batch_size, max_new_tokens)
    folder, target, images = _check_folder(images_dir, out_dir)
    todo = [p for p in images if overwrite or not _has_caption(caption_path(p, target))]
    summary = {"captioned": 0, "skipped": len(images) - len(todo), "empty": 0, "total": len(images)}
    if not todo:
        log.info("captions: all %d images in %s already have one", len(images), folder)
        return summary
    _check_headers(todo)
    target.mkdir(parents=True, exist_ok=True)

    if model is None:
        model, loaded_processor = load_captioner(model_id_or_path, device, dtype, local_files_only)
        processor = processor or loaded_processor
    else:
        if device is not None:
            model.to(resolve_device(device))
        model.eval()
        if processor is None:
            from transformers import AutoProcessor

            try:
                processor = AutoProcessor.from_pretrained(
                    str(model_id_or_path), local_files_only=local_files_only
                )
            except Exception as err:
                raise UserError(
                    f"processor of {model_id_or_path} cannot be loaded ({_reason(err)}): "
                    f"{_download_hint(str(model_id_or_path))}"
                ) from err

    empty: list[str] = []
    batch_size = int(batch_size)
    with tqdm(
        total=len(images), initial=summary["skipped"], desc="captioning", unit="image"
    ) as progress:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            # A file that fails to decode stops here with a UserError naming it; the captions
            # already written stay, so a rerun resumes.
            pictures = [load_rgb(path) for path in batch]
            try:
                captions = generate_captions(model, processor, pictures, prompt, max_new_tokens)
            except torch.cuda.OutOfMemoryError:
                raise UserError(
                    f"out of GPU memory at batch_size={batch_size}: lower batch_size and rerun "
                    "(finished captions are kept)"
                ) from None
            for path, caption in zip(batch, captions, strict=True):
                caption = caption.strip()
                if caption:
                    write_text_atomic(caption_path(path, target), caption + "\n")
                    summary["captioned"] += 1
                else:
                    empty.append(path.name)
            progress.update(len(batch))
    summary["empty"] = len(empty)
    if empty:
        log.warning(
            "%d images got an empty caption and no .txt file, first: %s (try more "
            "max_new_tokens or another prompt)",
            len(empty),
            empty[0],
        )
    return summary


# --- command line --------------------------------------------------------------------------------

# Keys of `--config` (conf/caption.yaml) and the argparse destinations they fill.
CONFIG_KEYS = (
    "model",
    "prompt",
    "batch_size",
    "max_new_tokens",
    "out_dir",
    "overwrite",
    "local_files_only",
    "device",
    "dtype",
)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m t2ilab.data.captioning",
        description="Dense captions for a folder of images with LLaVA (PixArt-alpha sec. 2.4): "
        "writes x.txt next to each image x.png, skipping images that already have one.",
    )
    parser.add_argument("images_dir", type=Path, help="a folder of .jpg/.png/.webp images")
    parser.add_argument("--model", default=None, help=f"hub id or local folder ({DEFAULT_MODEL})")
    parser.add_argument("--prompt", default=None, help=f'instruction ("{DEFAULT_PROMPT}")')
    parser.add_argument("--batch-size", type=int, default=None, help="images per batch (4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="caption length (256)")
    parser.add_argument(
        "--out-dir", default=None, help="folder for the .txt captions (default: IMAGES_DIR)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", default=None, help="recaption captioned images"
    )
    parser.add_argument(
        "--local-files-only",
        action="store_true",
        default=None,
        help="never contact the Hugging Face hub",
    )
    parser.add_argument("--device", default=None, help="torch device (cuda when available)")
    parser.add_argument("--dtype", default=None, help="float16/bfloat16/float32 (fp16 on CUDA)")
    parser.add_argument(
        "--config", type=Path, default=None, help="a YAML of these settings (conf/caption.yaml)"
    )
    return parser.parse_args(argv)


def _read_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.expanduser().read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--config {path} cannot be read ({err.__class__.__name__})") from None
    except yaml.YAMLError as err:
        reason = str(err).splitlines()[0] if str(err) else "invalid"
        raise UserError(f"--config {path} is not valid YAML ({reason})") from None
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} must be a mapping of settings (model: ..., prompt: ...)")
    unknown = sorted(set(data) - set(CONFIG_KEYS))
    if unknown:
        raise UserError(
            f"--config {path} has unknown keys {', '.join(map(str, unknown))}: "
            f"use {', '.join(CONFIG_KEYS)}"
        )
    return data


def _settings(args: argparse.Namespace) -> dict:
    """Defaults, then --config, then explicit flags."""
    settings = {
        "model": DEFAULT_MODEL,
        "prompt": DEFAULT_PROMPT,
        "batch_size": DEFAULT_BATCH_SIZE,
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "out_dir": None,
        "overwrite": False,
        "local_files_only": False,
        "device": None,
        "dtype": None,
    }
    if args.config is not None:
        settings.update(_read_config(args.config))
    for key in CONFIG_KEYS:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    for key in ("batch_size", "max_new_tokens"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int):
            raise UserError(f"{key}={settings[key]!r} must be a whole number")
    return settings


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        s = _settings(args)
        summary = caption_folder(
            args.images_dir,
            model_id_or_path=s["model"],
            prompt=s["prompt"],
            batch_size=s["batch_size"],
            max_new_tokens=s["max_new_tokens"],
            out_dir=s["out_dir"],
            overwrite=bool(s["overwrite"]),
            device=s["device"],
            dtype=s["dtype"],
            local_files_only=bool(s["local_files_only"]),
        )
    except UserError as err:
        print(f"t2ilab: error: {err}", file=sys.stderr)
        return 2
    out = s["out_dir"] or args.images_dir
    empty = f", {summary['empty']} empty" if summary["empty"] else ""
    print(
        f"{summary['captioned']} captioned, {summary['skipped']} skipped{empty} "
        f"of {summary['total']} images -> {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
