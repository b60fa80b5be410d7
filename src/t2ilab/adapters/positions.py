"""Where an adapter reads and where it writes: the position factors of Xiang et al. 2023.

"A Closer Look at Parameter-Efficient Tuning in Diffusion Models" (arXiv 2303.18181) splits an
adapter's design into an INPUT position (where its input is read), an OUTPUT position (where its
output is added) and a function form. Names follow the paper; the official code
(github.com/Xiang-cd/unet-finetune, `ldm/modules/attention.py`) fixes what each name means, and
this module follows that code, mapped onto diffusers' `BasicTransformerBlock` / `ResnetBlock2D`.

A transformer block (diffusers `BasicTransformerBlock`, norm_type "layer_norm") computes::

    h0 = block input                              <- SA_in    (residual stream entering the SA sub-block)
    a1 = attn1(norm1(h0))                         <- SA_out   (self-attention output, before the add)
    h1 = a1 + h0                                  <- CA_in    (residual stream entering the CA sub-block)
    c  = encoder_hidden_states                    <- CA_c     (cross-attention context, text tokens)
    a2 = attn2(norm2(h1), c)                      <- CA_out   (cross-attention output, before the add)
    h2 = a2 + h1                                  <- FFN_in   (residual stream entering the FFN sub-block)
    f  = ff(norm3(h2))                            <- FFN_out  (feed-forward output, before the add)
    h3 = f + h2 = block output                    <- Trans_out

and a ResBlock (diffusers `ResnetBlock2D`) maps Res_in (its input) to Res_out (its output).

As in the official code, X_in is the residual stream ENTERING a sub-block, i.e. before its
LayerNorm (the official `attn1i` is the block input `x`, `attn2i = attn1o + attn1i`, ...). Only
with that reading do the paper's merges below hold exactly; a vector added after a LayerNorm is
not equal to one added to the residual stream. Trans_out is the output of the transformer block
(official `transo`, the `BasicTransformerBlock` return value), not of the surrounding
`Transformer2DModel` (which adds proj_out and its own residual); SD 1.x has one block per
Transformer2DModel.

Input positions (10): all of the above. Every one can be read.

Output positions (7 distinct). Adding d to a sub-block's output before its residual add gives the
same residual stream as adding d to the next sub-block's input, because addition commutes:

    =============  ===========================  ==================================================
    output         also reached by (merged)     hook that writes it (diffusers module)
    =============  ===========================  ==================================================
    SA_in          --                           pre-hook of the BasicTransformerBlock (hidden_states)
    CA_in          SA_out   (a1 + d) + h0       forward hook of attn1: a1 + d
    CA_c           --                           pre-hook of attn2 (encoder_hidden_states kwarg)
    FFN_in         CA_out   (a2 + d) + h1       forward hook of attn2: a2 + d
    Trans_out      FFN_out  (f + d) + h2        forward hook of the BasicTransformerBlock: h3 + d
    Res_in         --                           pre-hook of the ResnetBlock2D (input_tensor)
    Res_out        --                           forward hook of the ResnetBlock2D
    =============  ===========================  ==================================================

These are exactly the official code's output choices (`attn1i, attn2i, attn2c, ffni, transo` for
transformer blocks, `resi, reso` for ResBlocks). The merged names SA_out / CA_out / FFN_out are
accepted as OUTPUT aliases and normalised to CA_in / FFN_in / Trans_out, so a sweep never holds
the same adapter twice under two names. The paper's best recipe, "CA_out -> FFN_in", reads the
cross-attention output and adds to the residual stream entering the FFN.

Validity (`validate_pair`): an output must not come before its input in the order below (the
adapter's output would be needed before its input exists); both ends must sit in the same kind of
block; the CA_c output (a text-token sequence of width cross_attention_dim) only takes the CA_c
input. Order within a transformer block: SA_in = CA_c (both exist when the block is entered)
< SA_out < CA_in < CA_out < FFN_in < FFN_out < Trans_out; within a ResBlock: Res_in < Res_out.

CA_c as input. The context has L text tokens of width cross_attention_dim, the image stream N
tokens of width dim. The paper's own pair is CA_c -> CA_c: a per-token adapter
cross_attention_dim -> r -> cross_attention_dim whose output is added to the context this block's
cross-attention sees (official `context = context + s * adapter(context)`). For CA_c -> an image
output (an extension beyond the paper's 20 pairs), the adapter maps each text token
cross_attention_dim -> r -> dim and its outputs are MEAN-POOLED over the text tokens, giving one
(B, 1, dim) vector per sample that broadcasts over all image tokens: a text-conditioned bias. Plain
mean over all tokens (padding included, as SD's CLIP context has no mask), so the result does not
depend on an attention mask the UNet may not get. `PAPER_PAIRS` lists the paper's 20 pairs.

adaLN blocks (PixArt: norm_type "ada_norm_single"; DiT: "ada_norm_zero"). The same names mean the
same tensors; only the gates differ. With shift/scale/gate from the timestep (PixArt:
scale_shift_table + timestep; DiT: returned by norm1)::

    h0 = block input                                  <- SA_in
    a1 = attn1(mod_msa(norm1(h0)))                    <- SA_out
    h1 = h0 + gate_msa * a1                           <- CA_in    (PixArt: attn2's input, no norm2)
    a2 = attn2(h1, c)                                 <- CA_out   (PixArt; DiT has no attn2)
    h2 = h1 + a2  (DiT: h2 = h1)                      <- FFN_in   (input of the FFN's norm)
    f  = ff(mod_mlp(norm(h2)))                        <- FFN_out  (norm2 on PixArt, norm3 on DiT)
    h3 = h2 + gate_mlp * f                            <- Trans_out

Outputs are written at the same hooks as on SD, so two of them reach the residual through a gate:

    =============  ========================================  ===================================
    output         hook                                      effect on the residual stream
    =============  ========================================  ===================================
    SA_in          block pre-hook                            h0 + d
    CA_in, SA_out  attn1 forward hook: a1 + d                h1 + gate_msa * d   (gated)
    CA_c           attn2 pre-hook (encoder_hidden_states)    c + d               (PixArt only)
    FFN_in, CA_out attn2 forward hook: a2 + d                h2 + d              (PixArt only)
    Trans_out      block forward hook                        h3 + d   (not gate_mlp * d: FFN_out
                                                                       as output means Trans_out)
    =============  ========================================  ===================================

Blocks without cross-attention (DiT) have no CA_c, no CA_out and no hook that writes FFN_in;
CA_in as an input is h1, which there is also FFN_in (h2 = h1). `missing_parts` says, before any
weights load, which pairs a denoiser cannot take (also ResBlock positions on a transformer).

Joint-attention (MM-DiT) blocks: SD3's `JointTransformerBlock`, Flux's double-stream
`FluxTransformerBlock`. An image stream x and a text stream c each have their own adaLN-Zero
modulation, feed-forward and residual; ONE attention runs over both token sets. For the image
tokens it is the self-attention and the cross-attention at once, so the image stream has one
attention sub-block, then the FFN::

    h0 = image stream entering the block              <- SA_in
    c0 = text stream entering the block               <- CA_c     (the text stream's counterpart)
    a, ca = attn(mod(norm1(h0)), mod(norm1_context(c0)))
    a  = the joint attention's image half             <- SA_out = CA_out
    h1 = h0 + gate_msa * a                            <- CA_in = FFN_in   (norm2's input)
    f  = ff(mod_mlp(norm2(h1)))                       <- FFN_out
    h2 = h1 + gate_mlp * f = image output             <- Trans_out
    (the text stream goes on the same way: c1 = c0 + c_gate_msa * ca, its own FFN; SD3's last
    block drops it)

    =============  ========================================  ===================================
    output         hook                                      effect on the streams
    =============  ========================================  ===================================
    SA_in          block pre-hook (hidden_states)            h0 + d
    CA_c           block pre-hook (encoder_hidden_states)    c0 + d: the text this block's
                                                             attention sees, and (as c is a
                                                             residual stream here) later blocks
    CA_in, FFN_in  attention forward hook: a + d             h1 + gate_msa * d   (gated)
    Trans_out      block forward hook (image output)         h2 + d
    =============  ========================================  ===================================

So on these blocks SA_out and CA_out name the same input, CA_in and FFN_in the same input and
the same output: the paper's best pair CA_out -> FFN_in reads the joint attention's image half
and adds it, gated, to the residual entering the FFN. CA_c is the text stream's counterpart
(read and written where the text enters the block); the text stream's own attention output and
FFN are not positions. Every valid pair of the paper's grid attaches; a sweep over the full grid
therefore holds some configurations twice under two names. CA_c -> an image output mean-pools
over the text tokens, as on SD. Flux's single-stream blocks (attention and MLP side by side on
the joined tokens) have no such order and get no adapters. SD3.5-Medium's dual-attention
(MMDiT-X) blocks add a second, image-only attention to h1, so the pairs that rebuild h1 (CA_in /
FFN_in -> CA_in / FFN_in) are refused there (`t2ilab.adapters.attach`).
"""

from __future__ import annotations

from t2ilab.errors import UserError

# Canonical names, in block order.
TRANSFORMER_INPUTS: tuple[str, ...] = (
    "SA_in",
    "SA_out",
    "CA_in",
    "CA_c",
    "CA_out",
    "FFN_in",
    "FFN_out",
    "Trans_out",
)
RESBLOCK_INPUTS: tuple[str, ...] = ("Res_in", "Res_out")
INPUT_POSITIONS: tuple[str, ...] = TRANSFORMER_INPUTS + RESBLOCK_INPUTS

TRANSFORMER_OUTPUTS: tuple[str, ...] = ("SA_in", "CA_in", "CA_c", "FFN_in", "Trans_out")
RESBLOCK_OUTPUTS: tuple[str, ...] = ("Res_in", "Res_out")
OUTPUT_POSITIONS: tuple[str, ...] = TRANSFORMER_OUTPUTS + RESBLOCK_OUTPUTS

# Output names that are not distinct: adding to a sub-block's output equals adding to the
# residual stream entering the next sub-block.
OUTPUT_MERGES: dict[str, str] = {"SA_out": "CA_in", "CA_out": "FFN_in", "FFN_out": "Trans_out"}

# When each position exists, in computation order. CA_c is an argument of the block, so it exists
# on entry, like SA_in.
ORDER: dict[str, int] = {
    "SA_in": 0,
    "CA_c": 0,
    "SA_out": 1,
    "CA_in": 2,
    "CA_out": 3,
    "FFN_in": 4,
    "FFN_out": 5,
    "Trans_out": 6,
    "Res_in": 0,
    "Res_out": 1,
}

# The official code's config names, accepted as aliases (github.com/Xiang-cd/unet-finetune).
OFFICIAL_NAMES: dict[str, str] = {
    "attn1i": "SA_in",
    "attn1o": "SA_out",
    "attn2i": "CA_in",
    "attn2o": "CA_out",
    "attn2c": "CA_c",
    "ffni": "FFN_in",
    "ffno": "FFN_out",
    "transo": "Trans_out",
    "resi": "Res_in",
    "reso": "Res_out",
}

# The 20 (input, output) pairs the paper trains (one config file each in the official repo).
PAPER_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("SA_in", "SA_in"),
        ("SA_in", "CA_in"),
        ("SA_in", "FFN_in"),
        ("SA_in", "Trans_out"),
        ("SA_out", "CA_in"),
        ("SA_out", "FFN_in"),
        ("SA_out", "Trans_out"),
        ("CA_in", "CA_in"),
        ("CA_in", "FFN_in"),
        ("CA_in", "Trans_out"),
        ("CA_c", "CA_c"),
        ("CA_out", "FFN_in"),
        ("CA_out", "Trans_out"),
        ("FFN_in", "FFN_in"),
        ("FFN_in", "Trans_out"),
        ("FFN_out", "Trans_out"),
        ("Trans_out", "Trans_out"),
        ("Res_in", "Res_in"),
        ("Res_in", "Res_out"),
        ("Res_out", "Res_out"),
    }
)

_LOOKUP: dict[str, str] = {
    **{n.lower(): n for n in INPUT_POSITIONS},
    **{k.lower(): v for k, v in OFFICIAL_NAMES.items()},
}


class InvalidAdapterPair(UserError):
    """An (input, output) position pair no adapter can implement; the message says why.

    A `UserError` (hence a `ValueError`), so `train.py` reports it as one line."""


def canonical_input(name: str) -> str:
    """'ca_out', 'CA_out' or the official 'attn2o' -> 'CA_out'. Unknown names raise ValueError."""
    key = str(name).strip().lower()
    if key not in _LOOKUP:
        raise InvalidAdapterPair(
            f"Unknown adapter input position {name!r}; choose one of {', '.join(INPUT_POSITIONS)}."
        )
    return _LOOKUP[key]


def canonical_output(name: str) -> str:
    """Like `canonical_input`, then merged: SA_out -> CA_in, CA_out -> FFN_in, FFN_out -> Trans_out."""
    key = str(name).strip().lower()
    if key not in _LOOKUP:
        raise InvalidAdapterPair(
            f"Unknown adapter output position {name!r}; choose one of "
            f"{', '.join(OUTPUT_POSITIONS)} (or SA_out / CA_out / FFN_out, merged into "
            "CA_in / FFN_in / Trans_out)."
        )
    pos = _LOOKUP[key]
    return OUTPUT_MERGES.get(pos, pos)


def family(position: str) -> str:
    """'transformer' or 'resblock': the kind of block a (canonical) position lives in."""
    return "resblock" if position in RESBLOCK_INPUTS else "transformer"


def validate_pair(input_position: str, output_position: str) -> tuple[bool, str]:
    """Whether an adapter can read at `input_position` and add at `output_position`.

    Returns (ok, reason); reason is one sentence, saying what the adapter does when ok and why it
    cannot be built otherwise.
    """
    try:
        inp = canonical_input(input_position)
        out = canonical_output(output_position)
    except InvalidAdapterPair as e:
        return False, str(e)
    raw_out = _LOOKUP[str(output_position).strip().lower()]
    merged = f" ({raw_out} as an output is the same as {out})" if raw_out != out else ""
    if family(inp) != family(out):
        return False, (
            f"{inp} is a {family(inp)} position and {out} a {family(out)} position: an adapter "
            "lives inside one block, so its input and output must be in the same kind of block."
        )
    if out == "CA_c" and inp != "CA_c":
        return False, (
            f"Output CA_c is the cross-attention context (text tokens of width "
            f"cross_attention_dim); an adapter reading {inp} (image tokens) cannot produce it, "
            "so CA_c only pairs with input CA_c."
        )
    if ORDER[out] < ORDER[inp]:
        return False, (
            f"Output {out} comes before input {inp} in the {family(inp)} block's computation, "
            "so the adapter's output would be needed before its input exists."
        )
    note = (
        " (extension: outputs mean-pooled over text tokens)"
        if (inp, out) not in PAPER_PAIRS
        else ""
    )
    return True, f"Reads {inp} and adds to {out}{merged}{note}."


# Positions that need a cross-attention layer in the block (DiT's blocks have none). FFN_in as an
# output is written at attn2's forward hook; CA_in as an input is h1, readable without attn2.
NEEDS_CROSS_ATTENTION_IN: tuple[str, ...] = ("CA_c", "CA_out")
NEEDS_CROSS_ATTENTION_OUT: tuple[str, ...] = ("CA_c", "FFN_in")


def missing_parts(
    input_position: str,
    output_position: str,
    has_cross_attention: bool = True,
    has_resblocks: bool = True,
    *,
    denoiser: str = "the denoiser",
) -> str | None:
    """Why a denoiser cannot take this pair, in one line; None when it can. No model needed:
    `has_cross_attention` is whether its transformer blocks have cross-attention (False on DiT),
    `has_resblocks` whether it has ResBlocks (False on PixArt / DiT). Invalid pairs give
    `validate_pair`'s reason."""
    ok, reason = validate_pair(input_position, output_position)
    if not ok:
        return reason
    inp, out = canonical_input(input_position), canonical_output(output_position)
    cross_in = () if has_cross_attention else NEEDS_CROSS_ATTENTION_IN
    cross_out = () if has_cross_attention else NEEDS_CROSS_ATTENTION_OUT
    inputs = [p for p in TRANSFORMER_INPUTS if p not in cross_in]
    outputs = [p for p in TRANSFORMER_OUTPUTS if p not in cross_out]
    if family(inp) == "resblock":
        if has_resblocks:
            return None
        return (
            f"Adapter positions {inp} -> {out} need ResBlocks, but {denoiser} has none (a "
            f"transformer); use transformer positions ({', '.join(inputs)})."
        )
    raw_out = _LOOKUP[str(output_position).strip().lower()]
    missing = [f"input {inp}"] if inp in cross_in else []
    if out in cross_out:
        missing.append(f"output {raw_out}" + (f" (= {out})" if raw_out != out else ""))
    if not missing:
        return None
    return (
        f"Adapter {' and '.join(missing)} {'have' if len(missing) > 1 else 'has'} no hook: "
        f"{denoiser}'s transformer blocks have no cross-attention (as in DiT); use inputs "
        f"{', '.join(inputs)} and outputs {', '.join(outputs)} (or SA_out / FFN_out, merged "
        "into CA_in / Trans_out)."
    )


def validity_matrix() -> dict[tuple[str, str], bool]:
    """{(input, output): ok} over the 10 inputs x 7 distinct outputs."""
    return {(i, o): validate_pair(i, o)[0] for i in INPUT_POSITIONS for o in OUTPUT_POSITIONS}


def valid_pairs() -> list[tuple[str, str]]:
    """All valid (input, output) pairs, inputs and outputs in block order."""
    return [pair for pair, ok in validity_matrix().items() if ok]
