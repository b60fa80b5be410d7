"""Attach adapters to an unmodified diffusers denoiser through forward hooks and pre-hooks.

The denoiser is SD's UNet, a PixArt, DiT, SD3 or Flux transformer. One adapter per transformer
block (`BasicTransformerBlock`, or a joint-attention block) or per `ResnetBlock2D`. Where each
position is read or written is tabled in `t2ilab.adapters.positions`; the hooks used, in the order they fire inside a transformer block::

    block pre-hook   read SA_in / CA_c,   write SA_in   (replaces the `hidden_states` argument)
    attn1 hook       read SA_out,         write CA_in   (a1 + d; same residual as SA_out + d)
    norm2 pre-hook   read CA_in           (norm2's input is the residual stream h1)
    attn2 pre-hook   read CA_c,           write CA_c    (replaces the `encoder_hidden_states` kwarg)
    attn2 hook       read CA_out,         write FFN_in  (a2 + d; same residual as CA_out + d)
    norm3 pre-hook   read FFN_in          (norm3's input is the residual stream h2)
    ff hook          read FFN_out
    block hook       read Trans_out,      write Trans_out

and on a ResnetBlock2D: its pre-hook reads / writes Res_in (the `input_tensor` argument, so the
change reaches both the residual branch and the shortcut), its forward hook Res_out.

That is an SD block (norm_type "layer_norm"); `hook_points(block)` gives each block's tables.
PixArt ("ada_norm_single") reads CA_in at attn2's pre-hook (its hidden_states: PixArt applies no
norm before cross-attention) and FFN_in at norm2's pre-hook (norm2 is the FFN's norm there; there
is no norm3). DiT ("ada_norm_zero", no attn2) reads CA_in and FFN_in (the same h1) at norm3's pre-hook
and has no CA_c, CA_out or FFN_in-output hook. Writes use the hooks above; on adaLN blocks the
CA_in write (at attn1) reaches the residual as gate_msa * d (tabled in positions.py).

A joint-attention block (SD3, Flux's double-stream blocks; `MMDIT_BLOCKS`) has one attention
`attn` returning (image, text) and returns (text, image) itself; the hooks touch the image half
of those tuples (`HookPoints.streams`)::

    block pre-hook   read SA_in / CA_c,   write SA_in / CA_c  (hidden_states / encoder_hidden_states)
    norm1 hook       gate_msa, for rebuilding h1
    attn hook        read SA_out = CA_out, write CA_in = FFN_in  (a + d, gated like a)
    norm2 pre-hook   read CA_in = FFN_in  (h1)
    ff hook          read FFN_out
    block hook       read Trans_out,      write Trans_out

A pair whose input is read after the hook that writes its output (CA_in -> CA_in, FFN_in ->
FFN_in) rebuilds the input at the writing hook from the residual stashed at an earlier hook
(h1 = h0 + a1, h2 = h1 + a2), as the official code does (`attn2i = attn1o + attn1i`); on adaLN
blocks h1 = h0 + gate_msa * a1, with gate_msa computed as diffusers does (PixArt: from the block's
`timestep` argument and scale_shift_table in a block pre-hook; DiT: norm1's output). Otherwise
the adapter output computed at the read hook waits in the block's slot until the write hook.

No diffusers class or forward is changed; `AdapterSet.remove()` takes every hook off again. The
adapters are not registered inside the UNet, so the UNet's state_dict (and any exported pipeline)
stays the base model; the AdapterSet is the module to train, register (e.g. as a submodule of the
LightningModule) and save. For the same reason the adapters do not follow `unet.to(device)`: they
are created on the UNet's device at attach time; move them with their owner or `adapters.to()`
(a mismatch is a clear error, not a silent copy).
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_flux import FluxTransformerBlock
from torch import nn

from t2ilab.adapters.config import AdapterConfig
from t2ilab.adapters.modules import ResBlockAdapter, TransformerAdapter
from t2ilab.adapters.positions import InvalidAdapterPair, missing_parts, validate_pair
from t2ilab.errors import UserError

# Hook events: (submodule attribute, "pre" | "post"); "" is the block itself.
BLOCK_PRE = ("", "pre")
NORM1_POST = ("norm1", "post")
ATTN1_POST = ("attn1", "post")
NORM2_PRE = ("norm2", "pre")
ATTN2_PRE = ("attn2", "pre")
ATTN2_POST = ("attn2", "post")
NORM3_PRE = ("norm3", "pre")
FF_POST = ("ff", "post")
BLOCK_POST = ("", "post")
ATTN_POST = ("attn", "post")  # MM-DiT's joint attention: returns (image, text)

# Joint-attention (MM-DiT) double-stream blocks: SD3's and Flux's. Their forwards are the same
# up to the names of the arguments after the two streams.
MMDIT_BLOCKS: tuple[type[nn.Module], ...] = (JointTransformerBlock, FluxTransformerBlock)
TRANSFORMER_BLOCKS: tuple[type[nn.Module], ...] = (BasicTransformerBlock, *MMDIT_BLOCKS)

# The tables of an SD block (norm_type "layer_norm"); `hook_points` derives the others.
_READ = {
    "SA_in": BLOCK_PRE,
    "CA_c": BLOCK_PRE,
    "SA_out": ATTN1_POST,
    "CA_in": NORM2_PRE,
    "CA_out": ATTN2_POST,
    "FFN_in": NORM3_PRE,
    "FFN_out": FF_POST,
    "Trans_out": BLOCK_POST,
    "Res_in": BLOCK_PRE,
    "Res_out": BLOCK_POST,
}
_WRITE = {
    "SA_in": BLOCK_PRE,
    "CA_in": ATTN1_POST,
    "CA_c": ATTN2_PRE,
    "FFN_in": ATTN2_POST,
    "Trans_out": BLOCK_POST,
    "Res_in": BLOCK_PRE,
    "Res_out": BLOCK_POST,
}
# Same-position pairs written before they can be read: (read here, residual stashed at).
_REBUILT = {
    ("CA_in", "CA_in"): (ATTN1_POST, BLOCK_PRE),
    ("FFN_in", "FFN_in"): (ATTN2_POST, NORM2_PRE),
}
SUPPORTED_NORM_TYPES: tuple[str, ...] = ("layer_norm", "ada_norm_single", "ada_norm_zero")


class HookPoints(NamedTuple):
    """Where one block's positions are read and written (events as above).

    read / write: position -> event; rebuilt: (inp, out) -> (read event, residual stashed at);
    gate: where gate_msa is captured for rebuilding h1 (None: no gate, SD); context_arg: where
    the block's forward takes the text (CA_c); streams: post events whose output is a tuple ->
    the index of the image stream in it (MM-DiT)."""

    read: dict[str, tuple[str, str]]
    write: dict[str, tuple[str, str]]
    rebuilt: dict[tuple[str, str], tuple[tuple[str, str], tuple[str, str]]]
    gate: tuple[str, str] | None
    context_arg: tuple[int, str] = (2, "encoder_hidden_states")
    streams: dict[tuple[str, str], int] = {}


# An MM-DiT double-stream block (tabled in positions.py): one joint attention is both the image
# tokens' self- and cross-attention, so SA_out = CA_out (its image half) and CA_in = FFN_in (the
# residual after it, norm2's input); CA_c is the text stream entering the block.
_MMDIT_READ = {
    "SA_in": BLOCK_PRE,
    "CA_c": BLOCK_PRE,
    "SA_out": ATTN_POST,
    "CA_out": ATTN_POST,
    "CA_in": NORM2_PRE,
    "FFN_in": NORM2_PRE,
    "FFN_out": FF_POST,
    "Trans_out": BLOCK_POST,
}
_MMDIT_WRITE = {
    "SA_in": BLOCK_PRE,
    "CA_c": BLOCK_PRE,
    "CA_in": ATTN_POST,  # a + d: reaches the residual as gate_msa * d
    "FFN_in": ATTN_POST,
    "Trans_out": BLOCK_POST,
}
# h1 is read after the attention hook that writes it: rebuilt there as h0 + gate_msa * a.
_MMDIT_REBUILT = {
    ("CA_in", "CA_in"): (ATTN_POST, BLOCK_PRE),
    ("CA_in", "FFN_in"): (ATTN_POST, BLOCK_PRE),
    ("FFN_in", "FFN_in"): (ATTN_POST, BLOCK_PRE),
}


def is_dual_attention(block: nn.Module) -> bool:
    """SD3.5-Medium's MMDiT-X blocks: a second, image-only attention after the joint one."""
    return bool(getattr(block, "use_dual_attention", False))


def hook_points(block: nn.Module) -> HookPoints:
    """The READ / WRITE / REBUILT tables of a block: a ResnetBlock2D, a BasicTransformerBlock of
    norm_type layer_norm (SD), ada_norm_single (PixArt) or ada_norm_zero (DiT), or an MM-DiT
    double-stream block (SD3's JointTransformerBlock, Flux's FluxTransformerBlock). Positions
    that the block lacks (no cross-attention) are absent from the tables."""
    if isinstance(block, MMDIT_BLOCKS):
        # On a dual-attention block h1 also holds the second attention's output, which the
        # attention hook cannot see yet: no rebuilt pairs there (refused at attach).
        rebuilt = {} if is_dual_attention(block) else dict(_MMDIT_REBUILT)
        return HookPoints(
            dict(_MMDIT_READ),
            dict(_MMDIT_WRITE),
            rebuilt,
            NORM1_POST,
            context_arg=(1, "encoder_hidden_states"),
            streams={ATTN_POST: 0, BLOCK_POST: 1},
        )
    if isinstance(block, ResnetBlock2D):
        return HookPoints(
            {k: _READ[k] for k in ("Res_in", "Res_out")},
            {k: _WRITE[k] for k in ("Res_in", "Res_out")},
            {},
            None,
        )
    norm_type = getattr(block, "norm_type", None)
    if norm_type not in SUPPORTED_NORM_TYPES:
        raise UserError(
            "Adapters support BasicTransformerBlocks of norm_type "
            f"{', '.join(SUPPORTED_NORM_TYPES)}; got {type(block).__name__} with "
            f"norm_type={norm_type!r}."
        )
    read = {k: v for k, v in _READ.items() if not k.startswith("Res")}
    write = {k: v for k, v in _WRITE.items() if not k.startswith("Res")}
    rebuilt = dict(_REBUILT)
    if norm_type == "ada_norm_single":  # no norm before attn2; norm2 is the FFN's norm
        read["CA_in"] = ATTN2_PRE
        read["FFN_in"] = NORM2_PRE
        rebuilt[("FFN_in", "FFN_in")] = (ATTN2_POST, ATTN2_PRE)
    if block.attn2 is None:  # h2 = h1: CA_in is read where FFN_in is
        read["CA_in"] = read["FFN_in"]
        for pos in ("CA_c", "CA_out"):
            del read[pos]
        for pos in ("CA_c", "FFN_in"):
            del write[pos]
        del rebuilt[("FFN_in", "FFN_in")]
    gate = {"ada_norm_single": BLOCK_PRE, "ada_norm_zero": NORM1_POST}.get(norm_type)
    return HookPoints(read, write, rebuilt, gate)


# The argument a pre-hook reads or replaces: (index in *args, keyword), from each forward's signature.
_HIDDEN_ARG = (0, "hidden_states")  # BasicTransformerBlock.forward
_TIMESTEP_ARG = (4, "timestep")  # BasicTransformerBlock.forward
_RES_INPUT_ARG = (0, "input_tensor")  # ResnetBlock2D.forward
_ATTN_HIDDEN_ARG = (0, "hidden_states")  # Attention.forward
_ATTN_CONTEXT_ARG = (1, "encoder_hidden_states")  # Attention.forward
_NORM_INPUT_ARG = (0, "input")  # LayerNorm.forward

# unet -> the AdapterSets attached to it (for count_adapter_parameters(unet)).
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet] = weakref.WeakKeyDictionary()


def block_key(name: str) -> str:
    """A UNet module name as a ModuleDict key: 'up_blocks.1.attentions.0.transformer_blocks.0'
    -> 'up_blocks_1_attentions_0_transformer_blocks_0'."""
    return name.replace(".", "_")


def _get_arg(args: tuple, kwargs: dict, where: tuple[int, str]) -> Any:
    index, name = where
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else None


def _set_arg(args: tuple, kwargs: dict, where: tuple[int, str], value: Any) -> tuple[tuple, dict]:
    index, name = where
    if name in kwargs or len(args) <= index:
        return args, {**kwargs, name: value}
    return args[:index] + (value,) + args[index + 1 :], kwargs


class _PreHook:
    """A forward pre-hook (with kwargs) that hands one argument to `_BlockHooks.step` and puts
    back what it returns. A class, not a closure, so a UNet with hooks still pickles."""

    def __init__(self, owner: _BlockHooks, event: tuple[str, str], where: tuple[int, str]):
        self.owner, self.event, self.where = owner, event, where

    def __call__(self, _module, args, kwargs):
        stream = _get_arg(args, kwargs, self.where)
        read = stream
        if self.event == BLOCK_PRE and self.owner.inp == "CA_c":
            read = _get_arg(args, kwargs, self.owner.points.context_arg)
        new = self.owner.step(self.event, stream, read)
        return None if new is None else _set_arg(args, kwargs, self.where, new)


class _PostHook:
    """A forward hook that hands the module's output to `_BlockHooks.step`; of a tuple output
    (MM-DiT's attention and block), the image stream only, put back in its place."""

    def __init__(self, owner: _BlockHooks, event: tuple[str, str]):
        self.owner, self.event = owner, event

    def __call__(self, _module, _args, output):
        index = self.owner.points.streams.get(self.event)
        if index is None:
            return self.owner.step(self.event, output, output)
        new = self.owner.step(self.event, output[index], output[index])
        if new is None:
            return None
        return (*output[:index], new, *output[index + 1 :])


class _GateHook:
    """Captures gate_msa for rebuilding h1 = h0 + gate_msa * a1 on an adaLN block, exactly as
    diffusers computes it: a block pre-hook on PixArt (scale_shift_table + timestep), a norm1
    forward hook on DiT (AdaLayerNormZero returns the gates)."""

    def __init__(self, owner: _BlockHooks):
        self.owner = owner

    def __call__(self, module, args, kwargs_or_output):
        # DiT's and MM-DiT's norm1: (x, gate_msa, shift, scale, gate_mlp)
        if isinstance(kwargs_or_output, tuple):
            self.owner.gate = kwargs_or_output[1].unsqueeze(1)
            return None
        hidden = _get_arg(args, kwargs_or_output, _HIDDEN_ARG)
        timestep = _get_arg(args, kwargs_or_output, _TIMESTEP_ARG)
        if timestep is None:
            raise RuntimeError("Adapter CA_in -> CA_in on a PixArt block needs its timestep.")
        table = module.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)
        self.owner.gate = table.chunk(6, dim=1)[2]
        return None


class _BlockHooks:
    """One adapter's hooks on one block, and the tensors carried between them in one forward."""

    def __init__(self, owner: AdapterSet, adapter: nn.Module, block: nn.Module, inp: str, out: str):
        # Strong: a UNet with hooks keeps its adapters alive, even if the caller drops the set.
        self.owner = owner
        self.adapter = adapter
        self.block = block
        self.inp, self.out = inp, out
        self.points = points = hook_points(block)
        self.write_event = points.write[out]
        self.read_event, self.stash_event = points.rebuilt.get((inp, out), (points.read[inp], None))
        if (inp, out) == ("CA_c", "CA_c"):  # the context as this block's attention gets it
            self.read_event = self.write_event
        self.pending: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.gate: torch.Tensor | None = None
        self.handles = []
        if self.stash_event == BLOCK_PRE and points.gate is not None:  # h1 behind gate_msa
            self.handles.append(self._register_gate(points.gate))
        events = dict.fromkeys(
            e for e in (self.stash_event, self.read_event, self.write_event) if e
        )
        self.handles += [self._register(event) for event in events]

    def _register_gate(self, event: tuple[str, str]):
        if event == BLOCK_PRE:
            return self.block.register_forward_pre_hook(_GateHook(self), with_kwargs=True)
        return getattr(self.block, event[0]).register_forward_hook(_GateHook(self))

    def _register(self, event: tuple[str, str]):
        attr, kind = event
        module = getattr(self.block, attr) if attr else self.block
        if kind == "post":
            return module.register_forward_hook(_PostHook(self, event))
        if attr == "attn2":  # the context for CA_c pairs, else h1 (PixArt's CA_in)
            where = _ATTN_CONTEXT_ARG if "CA_c" in (self.inp, self.out) else _ATTN_HIDDEN_ARG
        elif attr:
            where = _NORM_INPUT_ARG
        elif isinstance(self.block, ResnetBlock2D):
            where = _RES_INPUT_ARG
        elif self.out == "CA_c":  # MM-DiT writes the text stream at the block's entry
            where = self.points.context_arg
        else:
            where = _HIDDEN_ARG
        return module.register_forward_pre_hook(_PreHook(self, event, where), with_kwargs=True)

    def step(self, event, stream: torch.Tensor, read: torch.Tensor | None):
        """This adapter's work at `event`: `stream` is the tensor the hook may replace, `read` the
        adapter's input if it is read here. Returns the replacement, or None for no change."""
        if not self.owner.enabled:
            return None
        if event == self.stash_event:
            self.residual = stream
        delta = None
        if event == self.read_event:
            if event == FF_POST and getattr(self.block, "_chunk_size", None) is not None:
                raise RuntimeError(
                    "Adapters reading FFN_out do not support feed-forward chunking; "
                    "turn it off with block.set_chunk_feed_forward(None)."
                )
            if self.stash_event is not None:  # CA_in / FFN_in rebuilt at the writing hook
                branch = stream if self.gate is None else self.gate * stream
                read, self.residual, self.gate = self.residual + branch, None, None
            if read is None:
                raise RuntimeError(f"Adapter input {self.inp} was not passed to the block.")
            delta = self.adapter(read)
            if event != self.write_event:
                self.pending = delta
                return None
        if event == self.write_event:
            if delta is None:
                delta, self.pending = self.pending, None
                if delta is None:
                    raise RuntimeError(
                        f"Adapter {self.inp} -> {self.out}: the output hook ran before the input "
                        "hook (a custom block forward?)."
                    )
            return stream + delta
        return None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.pending = self.residual = self.gate = None


class AdapterSet(nn.Module):
    """The adapters attached to one UNet, keyed by `block_key(block name)`, plus their hooks.

    Train it, register it as a submodule of the LightningModule, `save_adapters` it; it has no
    forward of its own (the UNet's forward runs it). `enabled = False` makes the hooks pass
    through; `remove()` takes them off for good.
    """

    def __init__(self, config: AdapterConfig, adapters: Mapping[str, nn.Module]) -> None:
        super().__init__()
        self.config = config
        self.block_names: list[str] = list(adapters)
        self.adapters = nn.ModuleDict({block_key(n): m for n, m in adapters.items()})
        self.enabled = True
        self._hooks: list[_BlockHooks] = []
        self._unet_ref: weakref.ref | None = None

    def forward(self, *args, **kwargs):
        raise TypeError("AdapterSet has no forward: call the UNet it is attached to.")

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    @property
    def unet(self) -> nn.Module | None:
        return None if self._unet_ref is None else self._unet_ref()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.adapters.parameters())

    def remove(self) -> None:
        """Detach every hook: the UNet computes exactly what it did before attaching."""
        for hooks in self._hooks:
            hooks.remove()
        self._hooks = []
        unet = self.unet
        if unet is not None and unet in _ATTACHED:
            _ATTACHED[unet].discard(self)

    # Pickling / deepcopy (of the UNet, or of a LightningModule holding both) keep the set attached
    # to the copied UNet: the weak reference travels as a strong one and is weak again on arrival.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_unet_ref"] = self.unet
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        unet = state.pop("_unet_ref", None)
        super().__setstate__(state)
        self._unet_ref = None if unet is None else weakref.ref(unet)
        if unet is not None and self._hooks:
            _ATTACHED.setdefault(unet, weakref.WeakSet()).add(self)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"{c.input_position} -> {c.output_position}, rank={c.rank}, activation={c.activation}, "
            f"scale={c.scale}, blocks={len(self.block_names)}, attached={self.attached}"
        )


def _resolve_denoiser(obj: Any) -> nn.Module:
    """A denoiser (UNet, PixArt / DiT transformer) itself, or a pipeline's .unet / .transformer."""
    for attr in ("unet", "transformer"):
        module = getattr(obj, attr, None)
        if isinstance(module, nn.Module):
            return module
    if isinstance(obj, nn.Module):
        return obj
    raise UserError(
        "Expected a diffusers denoiser (UNet, PixArt / DiT transformer) or a pipeline with "
        f".unet or .transformer, got {type(obj).__name__}."
    )


_resolve_unet = _resolve_denoiser  # the old name


def _denoiser_name(denoiser: nn.Module) -> str:
    """'UNet' for any UNet class, else the class name (e.g. 'PixArtTransformer2DModel')."""
    name = type(denoiser).__name__
    return "UNet" if name.startswith("UNet") else name


def _find_blocks(denoiser: nn.Module, config: AdapterConfig) -> list[tuple[str, nn.Module]]:
    """The blocks adapters go on. On Flux these are the double-stream blocks only: a
    single-stream block runs attention and MLP side by side on the joined text and image
    tokens, so it has no SA_out -> FFN_in order to place Xiang et al.'s positions on."""
    kind = TRANSFORMER_BLOCKS if config.targets == "transformer" else ResnetBlock2D
    blocks = [(n, m) for n, m in denoiser.named_modules() if isinstance(m, kind)]
    what = _denoiser_name(denoiser)
    kind_name = "transformer block" if config.targets == "transformer" else "ResnetBlock2D"
    if not blocks:
        raise UserError(
            f"The {what} has no {kind_name} modules to attach {config.targets} adapters to."
        )
    if config.block_filter is not None:
        pattern = re.compile(config.block_filter)
        chosen = [(n, m) for n, m in blocks if pattern.search(n)]
        if not chosen:
            raise UserError(
                f"Adapter block_filter {config.block_filter!r} matches none of the {what}'s "
                f"{len(blocks)} {kind_name} modules (e.g. {blocks[0][0]!r})."
            )
        blocks = chosen
    return blocks


def _mmdit_adapter(name: str, block: nn.Module, config: AdapterConfig) -> nn.Module:
    inp, out = config.input_position, config.output_position
    if is_dual_attention(block) and (inp, out) in _MMDIT_REBUILT:
        raise UserError(
            f"Adapter {inp} -> {out} rebuilds the residual after attention, but {name!r} is a "
            "dual-attention (MMDiT-X) block whose residual also holds a second attention; choose "
            "another pair, or leave those blocks out with method.block_filter."
        )
    dim = block.norm2.normalized_shape[0]  # both streams have this width inside the blocks
    return TransformerAdapter(
        dim,
        dim,
        config.rank,
        config.activation,
        config.scale,
        pool_tokens=(inp == "CA_c" and out != "CA_c"),
    )


def has_cross_attention(block: nn.Module) -> bool:
    """Whether a transformer block's image tokens attend to the text (MM-DiT: jointly)."""
    return isinstance(block, MMDIT_BLOCKS) or block.attn2 is not None


def _transformer_adapter(name: str, block: nn.Module, config: AdapterConfig) -> nn.Module:
    if isinstance(block, MMDIT_BLOCKS):
        return _mmdit_adapter(name, block, config)
    attn2 = block.attn2
    if (
        getattr(block, "norm_type", None) not in SUPPORTED_NORM_TYPES
        or (attn2 is not None and not attn2.is_cross_attention)
        or block.only_cross_attention
        or block.pos_embed is not None
    ):
        raise UserError(
            "Adapters support BasicTransformerBlocks as in SD's UNet, PixArt or DiT (norm_type "
            f"{' / '.join(SUPPORTED_NORM_TYPES)}, self-attention then optional cross-attention); "
            f"{name!r} is not one (norm_type={block.norm_type!r})."
        )
    shape = getattr(block.norm1, "normalized_shape", None)  # DiT's AdaLayerNormZero has none
    dim = shape[0] if shape else block.attn1.to_q.in_features
    context_dim = attn2.to_k.in_features if attn2 is not None else None
    inp, out = config.input_position, config.output_position
    in_dim = context_dim if inp == "CA_c" else dim
    out_dim = context_dim if out == "CA_c" else dim
    return TransformerAdapter(
        in_dim,
        out_dim,
        config.rank,
        config.activation,
        config.scale,
        pool_tokens=(inp == "CA_c" and out != "CA_c"),
    )


def _resblock_adapter(name: str, block: nn.Module, config: AdapterConfig) -> nn.Module:
    inp, out = config.input_position, config.output_position
    if (inp, out) == ("Res_in", "Res_out") and (
        block.upsample is not None or block.downsample is not None
    ):
        raise UserError(
            f"Res_in -> Res_out needs a ResBlock that keeps its spatial size; {name!r} resamples."
        )
    norm = block.norm1 if inp == "Res_in" else block.norm2
    in_ch = block.in_channels if inp == "Res_in" else block.out_channels
    out_ch = block.in_channels if out == "Res_in" else block.out_channels
    return ResBlockAdapter(
        in_ch,
        out_ch,
        config.rank,
        config.activation,
        config.scale,
        num_groups=getattr(norm, "num_groups", 32),
        eps=getattr(norm, "eps", 1e-6),
    )


def _refuse_missing(denoiser: nn.Module, config: AdapterConfig, cross: bool, res: bool) -> None:
    reason = missing_parts(
        config.input_position, config.output_position, cross, res, denoiser=type(denoiser).__name__
    )
    if reason:
        raise UserError(reason)


def attach_adapters(
    unet: Any,
    config: AdapterConfig | Mapping[str, Any],
    *,
    dtype: torch.dtype = torch.float32,
) -> AdapterSet:
    """Create one zero-initialised adapter per matching block of `unet` and hook it in.

    `unet` is the denoiser: a `UNet2DConditionModel`, a `PixArtTransformer2DModel` /
    `DiTTransformer2DModel`, or a pipeline (its `.unet`, else its `.transformer`). Adapters are
    created on its device in `dtype` (float32 by default, also under a float16 model: they cast at
    their boundary). Raises `InvalidAdapterPair` for a pair no adapter can implement, a one-line
    UserError for one this denoiser lacks (`positions.missing_parts`: CA_* on DiT, Res_* on a
    transformer).
    """
    unet = _resolve_denoiser(unet)
    if not isinstance(config, AdapterConfig):
        config = AdapterConfig.from_dict(dict(config))
    ok, reason = validate_pair(config.input_position, config.output_position)
    if not ok:
        raise InvalidAdapterPair(reason)
    build = _transformer_adapter if config.targets == "transformer" else _resblock_adapter
    if config.targets == "resblock":
        _refuse_missing(
            unet, config, True, any(isinstance(m, ResnetBlock2D) for m in unet.modules())
        )
    blocks = _find_blocks(unet, config)
    if config.targets == "transformer":
        _refuse_missing(unet, config, all(has_cross_attention(b) for _, b in blocks), True)
    try:
        device = next(unet.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    adapters = {
        name: build(name, block, config).to(device=device, dtype=dtype) for name, block in blocks
    }
    adapter_set = AdapterSet(config, adapters)
    for name, block in blocks:
        adapter_set._hooks.append(
            _BlockHooks(
                adapter_set,
                adapter_set.adapters[block_key(name)],
                block,
                config.input_position,
                config.output_position,
            )
        )
    adapter_set._unet_ref = weakref.ref(unet)
    _ATTACHED.setdefault(unet, weakref.WeakSet()).add(adapter_set)
    return adapter_set


def freeze_unet_except_adapters(
    unet: Any, adapters: AdapterSet | Iterable[AdapterSet]
) -> list[nn.Parameter]:
    """Freeze every denoiser parameter, make the adapters trainable; returns the trainable
    parameters (what the optimizer gets)."""
    unet = _resolve_denoiser(unet)
    unet.requires_grad_(False)
    sets = [adapters] if isinstance(adapters, AdapterSet) else list(adapters)
    params: list[nn.Parameter] = []
    for s in sets:
        s.requires_grad_(True)
        params.extend(s.parameters())
    return params


def count_adapter_parameters(
    unet: Any, adapters: AdapterSet | Iterable[AdapterSet] | None = None
) -> tuple[int, float]:
    """(number of adapter parameters, their share of the UNet's own parameters, a fraction).

    Counts `adapters`, or by default every AdapterSet currently attached to `unet`. The UNet's
    count excludes the adapters (they are not registered inside it). SD 1.x with the default
    CA_out -> FFN_in adapters (rank 60): (1_511_040, 0.00176).
    """
    unet = _resolve_denoiser(unet)
    if adapters is None:
        sets = list(_ATTACHED.get(unet, ()))
    elif isinstance(adapters, AdapterSet):
        sets = [adapters]
    else:
        sets = list(adapters)
    n = sum(s.num_parameters() for s in sets)
    total = sum(p.numel() for p in unet.parameters())
    return n, (n / total if total else 0.0)
