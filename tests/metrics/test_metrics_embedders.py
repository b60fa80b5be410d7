"""DINO/CLIP embedders on tiny random models saved to disk and loaded back by path."""

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, ViTModel
from transformers.modeling_outputs import BaseModelOutputWithPooling

from t2ilab.errors import UserError
from t2ilab.metrics import (
    ClipEmbedder,
    DinoEmbedder,
    MetricModelNotFound,
    evaluate_dreambooth,
    load_embedder,
    mean_matched_cosine,
    mean_pairwise_cosine,
    mean_pairwise_cosine_within,
)
from t2ilab.metrics.embedders import IMAGENET_MEAN, IMAGENET_STD, _features
from t2ilab.metrics.images import tensor_to_pil, to_image_tensor


@pytest.fixture(scope="module")
def dino(tiny_vit_dir):
    return DinoEmbedder.from_pretrained(tiny_vit_dir, local_files_only=True)  # a Path is fine


@pytest.fixture(scope="module")
def clip(tiny_clip_dir):
    return load_embedder("clip", str(tiny_clip_dir), local_files_only=True)


def test_loader_builds_the_right_embedders(dino, clip, tiny_vit_dir):
    assert isinstance(dino, DinoEmbedder) and dino.image_processor is not None
    loaded = load_embedder("dino", str(tiny_vit_dir), device="cpu", local_files_only=True)
    assert isinstance(loaded, DinoEmbedder) and loaded.device == torch.device("cpu")
    assert isinstance(clip, ClipEmbedder) and clip.image_processor is not None
    assert clip.max_length == 40


def test_dino_is_the_cls_token_of_the_last_hidden_state(dino, tiny_vit_dir):
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    emb = dino.embed_images(images, batch_size=2)
    assert emb.shape == (5, 32) and emb.dtype == torch.float32

    model = ViTModel.from_pretrained(tiny_vit_dir).eval()
    pil = [tensor_to_pil(img) for img in images]
    pixels = dino.image_processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        ref = model(pixel_values=pixels).last_hidden_state[:, 0]
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # batching and input type do not change the result
    torch.testing.assert_close(dino.embed_images(pil, batch_size=5), emb, atol=1e-5, rtol=1e-5)


def test_torch_preprocessing_without_image_processor(tiny_vit_dir):
    model = ViTModel.from_pretrained(tiny_vit_dir)
    embedder = DinoEmbedder(model)  # no processor: resize + ImageNet normalisation in torch
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(1))
    emb = embedder.embed_images(images, progress=True)

    resized = F.interpolate(images, size=(32, 32), mode="bicubic", antialias=True).clamp(0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = model(pixel_values=(resized - mean) / std).last_hidden_state[:, 0]
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # PIL images of different sizes are resized one by one
    pil = [tensor_to_pil(images[0]), tensor_to_pil(images[1, :, :32, :36])]
    assert embedder.embed_images(pil).shape == (2, 32)


def test_similarity_of_identical_and_different_sets(dino, clip, red_squares, blue_noise):
    red, red_again, blue = red_squares(6, seed=0), red_squares(6, seed=5), blue_noise(6)
    for embedder in (dino, clip):
        e_red = embedder.embed_images(red)
        # the same images embed identically, so matched similarity is 1
        assert float(mean_matched_cosine(e_red, embedder.embed_images(red.clone()))) == (
            pytest.approx(1.0, abs=1e-5)
        )
        one = embedder.embed_images(red[:1].repeat(3, 1, 1, 1))
        assert float(mean_pairwise_cosine(one, one)) == pytest.approx(1.0, abs=1e-5)
        same_kind = float(mean_pairwise_cosine(e_red, embedder.embed_images(red_again)))
        other_kind = float(mean_pairwise_cosine(e_red, embedder.embed_images(blue)))
        assert same_kind > other_kind + 0.05, type(embedder).__name__
        assert float(mean_pairwise_cosine_within(e_red)) > other_kind


def test_clip_features_match_the_model(clip, tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    texts = ["a dog in the snow", "a red cube", "a cat"]
    emb = clip.embed_texts(texts, batch_size=2)
    assert emb.shape == (3, 16)
    tokens = clip.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = _features(model.get_text_features(**tokens))
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-5)
    # padding to a longer batch must not change a prompt's embedding
    torch.testing.assert_close(clip.embed_texts(texts[2:]), emb[2:], atol=1e-5, rtol=1e-5)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    pixels = clip.image_processor(images=[tensor_to_pil(i) for i in images], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        ref_img = _features(model.get_image_features(pixel_values=pixels))
    torch.testing.assert_close(clip.embed_images(images), ref_img, atol=1e-5, rtol=1e-5)

    with pytest.raises(TypeError, match="list of strings"):
        clip.embed_texts("a dog")


def test_features_accepts_tensor_output_object_and_tuple():
    x = torch.randn(2, 4)
    assert _features(x) is x
    out = BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 3, 4), pooler_output=x)
    assert _features(out) is x
    assert _features((torch.randn(2, 3, 4), x)) is x
    with pytest.raises(TypeError):
        _features(object())


def _assert_one_line_not_found(err: pytest.ExceptionInfo, name: str, key: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert f"'{name}'" in msg and f"{key}=DIR" in msg and "--local-dir" in msg
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    # no chained hub traceback is shown to the user
    assert err.value.__cause__ is None
    assert err.value.__context__ is None or err.value.__suppress_context__


def test_missing_hub_model_offline():
    with pytest.raises(MetricModelNotFound) as err:
        load_embedder("dino", "facebook/dino-vits16", local_files_only=True)
    _assert_one_line_not_found(err, "facebook/dino-vits16", "eval.dino_model")
    assert "hf download facebook/dino-vits16" in str(err.value)
    with pytest.raises(MetricModelNotFound) as err:
        load_embedder("clip", "openai/clip-vit-base-patch32", local_files_only=True)
    _assert_one_line_not_found(err, "openai/clip-vit-base-patch32", "eval.clip_model")


def test_wrong_local_paths(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(MetricModelNotFound) as err:
        # local_files_only=False: a missing folder must fail fast, not be sent to the hub
        load_embedder("dino", missing)
    _assert_one_line_not_found(err, str(missing), "eval.dino_model")
    assert "hf download facebook/dino-vits16" in str(err.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(MetricModelNotFound) as err:
        load_embedder("clip", tmp_path / "empty", local_files_only=True)
    _assert_one_line_not_found(err, str(tmp_path / "empty"), "eval.clip_model")

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text("{}")
    with pytest.raises(MetricModelNotFound):
        load_embedder("dino", junk, local_files_only=True, config_key="metrics.dino")


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown embedder kind"):
        load_embedder("inception", "x")


def test_evaluate_dreambooth_end_to_end(dino, clip, red_squares, blue_noise):
    generations = {
        "a sks dog in the snow": red_squares(3, seed=1),
        "a sks dog on the beach": [tensor_to_pil(i) for i in red_squares(2, seed=2)],
    }
    real = red_squares(4, seed=3)
    prior = blue_noise(3)
    result = evaluate_dreambooth(
        generations,
        real,
        "sks",
        dino,
        clip,
        prior_images=prior,
        distance=lambda a, b: (a - b).abs().mean(dim=(1, 2, 3)),
    )
    assert set(result.metrics) == {"dino", "clip_i", "clip_t", "pres", "div", "prior_div"}
    assert [r.prompt for r in result.rows] == list(generations)
    prior_t = to_image_tensor(prior)  # the class-prompt generations' own mean pairwise distance
    pairs = [(0, 1), (0, 2), (1, 2)]
    expected_prior_div = sum(float((prior_t[i] - prior_t[j]).abs().mean()) for i, j in pairs) / len(
        pairs
    )
    assert result.metrics["prior_div"] == pytest.approx(expected_prior_div, rel=1e-5)

    gen_all = torch.cat([generations["a sks dog in the snow"], red_squares(2, seed=2)])
    expected_dino = float(mean_pairwise_cosine(dino.embed_images(gen_all), dino.embed_images(real)))
    assert result.metrics["dino"] == pytest.approx(expected_dino, abs=1e-4)
    text = clip.embed_texts(["a dog in the snow"])  # identifier removed before CLIP-T
    img = clip.embed_images(generations["a sks dog in the snow"])
    expected_t = float(mean_matched_cosine(text.expand(3, -1), img))
    assert result.rows[0].clip_t == pytest.approx(expected_t, abs=1e-5)
    # the class prior (blue noise) looks less like the subject than the subject generations do
    assert result.metrics["pres"] < result.metrics["dino"]
