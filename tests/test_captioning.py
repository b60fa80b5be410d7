"""Dense captioning (t2ilab.data.captioning) with a tiny random LLaVA built and saved in-test:
no hub, no downloads. The tokenizer is a WordLevel `tokenizers` model over a few words."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from t2ilab.data import captioning
from t2ilab.data.captioned import METADATA_FILE, read_captioned_folder
from t2ilab.data.captioning import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    build_prompt,
    caption_folder,
    load_captioner,
)
from t2ilab.errors import UserError

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
WORDS = (
    "USER: ASSISTANT: Describe this image and its style in a very detailed manner "
    "a photo of red blue green dog cat sitting on the grass painting bright dark tree sky house"
).split()
# LLaVA-1.5's template, shortened: "USER: <image>\n<text> ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}{% for content in message['content'] %}"
    "{% if content['type'] == 'text' %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
MAX_NEW_TOKENS = 6


def _tiny_processor(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(WORDS)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    )
    # 30 px / 15 px patches = 4 patches + CLS; "default" drops CLS -> 4 <image> tokens per image.
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=15,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


def _tiny_model(processor):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    tokenizer = processor.tokenizer
    # initializer_range 0.2 (not 0.02): large enough that captions depend on the image.
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            image_size=30,
            patch_size=15,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=256,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            initializer_range=0.2,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=4,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # special tokens get logit 0, below the best word: never empty
        for token in SPECIALS:
            model.lm_head.weight[tokenizer.convert_tokens_to_ids(token)] = 0.0
    return model


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory) -> Path:
    """A saved tiny LLaVA folder (model + processor with a chat template)."""
    folder = tmp_path_factory.mktemp("tiny_llava")
    processor = _tiny_processor(CHAT_TEMPLATE)
    _tiny_model(processor).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def loaded(tiny_llava):
    return load_captioner(tiny_llava, device="cpu", local_files_only=True)


def _make_images(folder: Path, n: int = 5) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        array = (rng.random((36 + 4 * i, 44, 3)) * 255).astype("uint8")
        path = folder / f"img_{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(array).save(path)
        paths.append(path)
    return paths


def _captions(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def _run(folder, loaded, **kwargs):
    model, processor = loaded
    kwargs.setdefault("max_new_tokens", MAX_NEW_TOKENS)
    return caption_folder(folder, model=model, processor=processor, **kwargs)


def test_tiny_processor_expands_image_token(loaded):
    _, processor = loaded
    image = Image.new("RGB", (40, 50), "red")
    inputs = processor(images=[image], text=["USER: <image>\nDescribe"], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_id).sum()) == 4
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 30, 30)


def test_every_image_gets_a_caption_readable_as_captioned_folder(tmp_path, loaded):
    images = _make_images(tmp_path / "imgs")
    summary = _run(tmp_path / "imgs", loaded, batch_size=2)
    assert summary == {"captioned": 5, "skipped": 0, "empty": 0, "total": 5}
    for image in images:
        text = image.with_suffix(".txt").read_text(encoding="utf-8")
        assert text.strip() and text == text.strip() + "\n"
    items = read_captioned_folder(tmp_path / "imgs")
    assert [p for p, _ in items] == images
    assert all(caption for _, caption in items)
    # The image reaches the model: not every image gets the same caption.
    assert len({caption for _, caption in items}) > 1
    assert not list((tmp_path / "imgs").glob(".*.tmp"))  # no temp files left behind


def test_rerun_skips_everything_without_loading_a_model(tmp_path, loaded):
    _make_images(tmp_path / "imgs")
    _run(tmp_path / "imgs", loaded, batch_size=3)
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("imgs/*.txt")}
    # Nothing to do: the (nonexistent) model is never loaded.
    summary = caption_folder(tmp_path / "imgs", model_id_or_path=str(tmp_path / "no_model"))
    assert summary == {"captioned": 0, "skipped": 5, "empty": 0, "total": 5}
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("imgs/*.txt")}
    assert after == before


def test_user_captions_are_kept_unless_overwrite(tmp_path, loaded):
    images = _make_images(tmp_path / "imgs")
    mine = images[1].with_suffix(".txt")
    mine.write_text("my own caption", encoding="utf-8")
    images[2].with_suffix(".txt").write_text("  \n", encoding="utf-8")  # empty: captioned again
    summary = _run(tmp_path / "imgs", loaded, batch_size=2)
    assert summary == {"captioned": 4, "skipped": 1, "empty": 0, "total": 5}
    assert mine.read_text(encoding="utf-8") == "my own caption"
    assert images[2].with_suffix(".txt").read_text(encoding="utf-8").strip()

    reference = _captions(tmp_path / "imgs")
    summary = _run(tmp_path / "imgs", loaded, batch_size=2, overwrite=True)
    assert summary == {"captioned": 5, "skipped": 0, "empty": 0, "total": 5}
    regenerated = _captions(tmp_path / "imgs")
    assert regenerated[mine.name] != "my own caption"
    assert {k: v for k, v in regenerated.items() if k != mine.name} == {
        k: v for k, v in reference.items() if k != mine.name
    }


def test_captions_are_deterministic_and_independent_of_batch_size(tmp_path, loaded):
    _make_images(tmp_path / "imgs")
    results = []
    for name, batch_size in [("a", 1), ("b", 3), ("c", 3), ("d", 5)]:
        _run(tmp_path / "imgs", loaded, batch_size=batch_size, out_dir=tmp_path / name)
        results.append(_captions(tmp_path / name))
    assert len(results[0]) == 5
    assert all(result == results[0] for result in results[1:])


def test_out_dir_holds_the_captions_and_leaves_images_alone(tmp_path, loaded):
    images = _make_images(tmp_path / "imgs", n=3)
    summary = _run(tmp_path / "imgs", loaded, out_dir=tmp_path / "captions")
    assert summary["captioned"] == 3
    assert sorted(_captions(tmp_path / "captions")) == [f"{p.stem}.txt" for p in images]
    assert not list((tmp_path / "imgs").glob("*.txt"))


def test_loading_from_a_saved_folder_matches_passed_in_model(tmp_path, tiny_llava, loaded):
    _make_images(tmp_path / "imgs", n=3)
    summary = caption_folder(
        tmp_path / "imgs",
        tiny_llava,
        max_new_tokens=MAX_NEW_TOKENS,
        out_dir=tmp_path / "from_path",
        local_files_only=True,
        device="cpu",
    )
    assert summary["captioned"] == 3
    _run(tmp_path / "imgs", loaded, out_dir=tmp_path / "passed_in")
    assert _captions(tmp_path / "from_path") == _captions(tmp_path / "passed_in")


def test_prompt_uses_chat_template_else_llava_format(loaded):
    _, processor = loaded
    assert build_prompt(processor, DEFAULT_PROMPT) == f"USER: <image>\n{DEFAULT_PROMPT} ASSISTANT:"
    bare = _tiny_processor(chat_template=None)
    assert build_prompt(bare, "Hi") == "USER: <image>\nHi ASSISTANT:"
    other = _tiny_processor(
        chat_template="{{ 'Q: ' }}<image>{{ messages[0]['content'][1]['text'] }}"
    )
    assert build_prompt(other, "Hi") == "Q: <image>Hi"


def test_only_new_tokens_are_decoded(tmp_path, loaded):
    _make_images(tmp_path / "imgs", n=2)
    _run(tmp_path / "imgs", loaded)
    for caption in _captions(tmp_path / "imgs").values():
        # The prompt alone is 14 words (16 tokens with <image>): none of it is decoded.
        assert DEFAULT_PROMPT not in caption
        assert 1 <= len(caption.split()) <= MAX_NEW_TOKENS


def test_empty_generation_writes_no_file(tmp_path, loaded, monkeypatch):
    _make_images(tmp_path / "imgs", n=3)
    monkeypatch.setattr(
        captioning, "generate_captions", lambda m, p, images, *a: ["", "x", " "][: len(images)]
    )
    summary = _run(tmp_path / "imgs", loaded, batch_size=3)
    assert summary == {"captioned": 1, "skipped": 0, "empty": 2, "total": 3}
    assert list(_captions(tmp_path / "imgs").values()) == ["x\n"]


# --- user errors ---------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_local_model_is_one_line_error(tmp_path):
    _make_images(tmp_path / "imgs", n=1)
    with pytest.raises(UserError) as err:
        caption_folder(tmp_path / "imgs", str(tmp_path / "nowhere" / "llava"))
    message = _one_line(err)
    assert "does not exist" in message and str(tmp_path / "nowhere" / "llava") in message
    assert f"hf download {DEFAULT_MODEL} --local-dir DIR" in message and "model=DIR" in message
    assert not list((tmp_path / "imgs").glob("*.txt"))


def test_uncached_hub_model_offline_is_one_line_error(tmp_path):
    _make_images(tmp_path / "imgs", n=1)
    with pytest.raises(UserError) as err:
        caption_folder(tmp_path / "imgs", "t2ilab-test/no-such-llava", local_files_only=True)
    message = _one_line(err)
    assert "t2ilab-test/no-such-llava" in message
    assert "hf download t2ilab-test/no-such-llava --local-dir DIR" in message


def test_incomplete_model_folder_is_one_line_error(tmp_path):
    _make_images(tmp_path / "imgs", n=1)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "README.md").write_text("not a model")
    with pytest.raises(UserError) as err:
        caption_folder(tmp_path / "imgs", tmp_path / "model", local_files_only=True)
    assert "cannot be loaded" in _one_line(err)


def test_folder_is_checked_before_the_model_loads(tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not load for a bad folder")

    monkeypatch.setattr(captioning, "load_captioner", no_loading)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no images"):
        caption_folder(tmp_path / "empty", str(tmp_path / "no_model"))
    with pytest.raises(UserError, match="does not exist"):
        caption_folder(tmp_path / "missing", str(tmp_path / "no_model"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="cannot be read as an image"):
        caption_folder(tmp_path / "bad")


@pytest.mark.parametrize(
    ("setup", "kwargs", "match"),
    [
        (lambda d: (d / "metadata.jsonl").write_text(""), {}, "metadata.jsonl"),
        (lambda d: Image.new("RGB", (8, 8)).save(d / "img_0.png"), {}, "share the caption file"),
        (lambda d: None, {"batch_size": 0}, "batch_size=0"),
        (lambda d: None, {"max_new_tokens": 0}, "max_new_tokens=0"),
        (lambda d: None, {"prompt": " "}, "prompt is empty"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, setup, kwargs, match):
    _make_images(tmp_path / "imgs", n=1)  # img_0.jpg
    setup(tmp_path / "imgs")
    with pytest.raises(UserError, match=match) as err:
        caption_folder(tmp_path / "imgs", str(tmp_path / "no_model"), **kwargs)
    _one_line(err)


def test_captions_the_user_wrote_are_kept_in_any_encoding(tmp_path, loaded):
    images = _make_images(tmp_path / "imgs", n=5)
    mine = {
        images[0].with_suffix(".txt"): "un café, à Paris\r\n".encode("utf-16"),
        images[1].with_suffix(".txt"): "un café\r\n".encode("cp1252"),
        images[2].with_suffix(".txt"): b"\xef\xbb\xbfa dog\r\n",
    }
    for path, raw in mine.items():
        path.write_bytes(raw)
    images[3].with_suffix(".txt").write_bytes(b"\xef\xbb\xbf\r\n")  # a BOM alone: no caption
    summary = _run(tmp_path / "imgs", loaded, batch_size=2)
    assert summary == {"captioned": 2, "skipped": 3, "empty": 0, "total": 5}
    assert all(path.read_bytes() == raw for path, raw in mine.items())
    assert images[3].with_suffix(".txt").read_text(encoding="utf-8").strip()


@pytest.mark.parametrize("kind", ["folder", "broken link"])
def test_something_in_the_way_of_a_caption_fails_before_the_model_loads(tmp_path, kind):
    images = _make_images(tmp_path / "imgs", n=2)
    blocker = images[1].with_suffix(".txt")
    if kind == "folder":
        blocker.mkdir()
    else:
        blocker.symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(UserError) as err:
        caption_folder(tmp_path / "imgs", str(tmp_path / "no_model"))
    assert _one_line(err).startswith(f"{blocker} is in the way of the caption of img_1.png")
    assert blocker.is_symlink() or blocker.is_dir()
    assert not images[0].with_suffix(".txt").exists()


def test_hidden_and_non_image_files_are_not_captioned(tmp_path, loaded):
    images = _make_images(tmp_path / "imgs", n=2)
    (tmp_path / "imgs" / "._img_0.jpg").write_bytes(b"\0\5\26\7")  # macOS metadata
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"\0")
    (tmp_path / "imgs" / "README.txt").write_text("my photos")
    assert _run(tmp_path / "imgs", loaded)["total"] == 2
    assert sorted(p.name for p in (tmp_path / "imgs").glob("*.txt")) == [
        "README.txt",
        *(p.with_suffix(".txt").name for p in images),
    ]


def _cli_error(capsys, *args: str) -> str:
    assert captioning.main(list(args)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("t2ilab: error: "), lines
    return lines[0]


def test_cli_image_folder_missing_a_file_or_without_images(tmp_path, capsys):
    assert "does not exist" in _cli_error(capsys, str(tmp_path / "missing"))
    _make_images(tmp_path / "imgs", n=1)
    assert "is a file: pass the folder that holds it" in _cli_error(
        capsys, str(tmp_path / "imgs" / "img_0.jpg")
    )
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "._photo.jpg").write_bytes(b"\0\5\26\7")
    (junk / "notes.txt").write_text("todo")
    assert "has no images" in _cli_error(capsys, str(junk))


# --- command line --------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "t2ilab.data.captioning", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_captions_a_folder(tmp_path, tiny_llava):
    images = _make_images(tmp_path / "imgs", n=3)
    config = tmp_path / "caption.yaml"
    config.write_text(yaml.safe_dump({"max_new_tokens": 100, "batch_size": 2, "device": "cpu"}))
    result = _cli(
        str(tmp_path / "imgs"),
        "--model",
        str(tiny_llava),
        "--max-new-tokens",
        str(MAX_NEW_TOKENS),  # overrides the config's 100
        "--local-files-only",
        "--config",
        str(config),
    )
    assert result.returncode == 0, result.stderr
    assert "3 captioned, 0 skipped of 3 images" in result.stdout
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8") for p in images]
    assert all(c.strip() and len(c.split()) <= MAX_NEW_TOKENS for c in captions)
    assert len(read_captioned_folder(tmp_path / "imgs")) == 3


def test_cli_errors_are_one_stderr_line_and_exit_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = _cli(str(tmp_path / "empty"), "--model", str(tmp_path / "no_model"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("t2ilab: error: ") and "has no images" in lines[0]
    )

    _make_images(tmp_path / "imgs", n=1)
    result = _cli(str(tmp_path / "imgs"), "--model", str(tmp_path / "no_model"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "hf download" in lines[0], result.stderr


def test_cli_rejects_unknown_config_keys(tmp_path):
    _make_images(tmp_path / "imgs", n=1)
    config = tmp_path / "bad.yaml"
    config.write_text("batchsize: 2\n")
    assert captioning.main([str(tmp_path / "imgs"), "--config", str(config)]) == 2


def test_conf_caption_yaml_matches_the_defaults():
    config = yaml.safe_load((REPO / "conf" / "caption.yaml").read_text(encoding="utf-8"))
    assert config["model"] == DEFAULT_MODEL
    assert config["prompt"] == DEFAULT_PROMPT
    assert config["batch_size"] == captioning.DEFAULT_BATCH_SIZE
    assert config["max_new_tokens"] == DEFAULT_MAX_NEW_TOKENS
    assert set(config) <= set(captioning.CONFIG_KEYS)


def test_metadata_file_name_matches_the_captioned_reader():
    assert captioning.METADATA_FILE == METADATA_FILE


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda(tmp_path, tiny_llava):
    _make_images(tmp_path / "imgs", n=3)
    model, processor = load_captioner(tiny_llava, device="cuda", local_files_only=True)
    assert model.dtype == torch.float16 and model.device.type == "cuda"
    summary = caption_folder(
        tmp_path / "imgs", model=model, processor=processor, max_new_tokens=MAX_NEW_TOKENS
    )
    assert summary["captioned"] == 3
    assert len(read_captioned_folder(tmp_path / "imgs")) == 3
