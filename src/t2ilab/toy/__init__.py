"""The toy world and its small pretrained models, so CPU runs learn something.

The world itself: `t2ilab.toy.world` (scenes, renders, captions, subjects; `python -m
t2ilab.toy.world` writes image folders) and `t2ilab.toy.datamodules` (the `data=toy_world` and
`data=toy_world_classes` datamodules, rendered on the fly).

Its models: `python pretrain_toy.py toy_component=vae|clip|dino` trains one on the streams of
`t2ilab.toy.streams` (recipes in conf/toy_component/); the results ship in models/toy/:
`toy_vae` (AutoencoderKL), `toy_clip` (CLIPModel + a small CLIP tokenizer), `toy_dino`
(ResNetModel for the DINO metric). Quality numbers and how they are measured:
`t2ilab.toy.quality`, experiments/toy_world/README.md.
"""
