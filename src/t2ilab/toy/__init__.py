"""Small pretrained models of the toy world (`t2ilab.data.toy`), so CPU runs learn something.

`python pretrain_toy.py toy_component=vae|clip|dino` trains one (recipes in
conf/toy_component/); the results ship in models/toy/: `toy_vae` (AutoencoderKL), `toy_clip`
(CLIPModel + a small CLIP tokenizer), `toy_dino` (ResNetModel for the DINO metric). Quality
numbers and how they are measured: `t2ilab.toy.quality`, experiments/toy_world/README.md.
"""
