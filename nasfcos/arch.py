"""The NAS-FCOS decoder search space (paper §3.2, Figs. 1-4, Table 1).

An :class:`Arch` is the one object every stage passes around: the controller
samples it, the proxy task trains it, ``results.parquet`` stores it and full
training builds it. Its wiring is data, never module code.

Canonical string (also the constructor input of :meth:`Arch.parse`)::

    fpn=[3,3,4,4,1][3,3,4,4,1][4,3,4,3,1][1,3,4,3,1][5,3,4,4,1][4,7,4,4,1][7,2,4,4,1];head=seq[5,1,5,0,4,4];share=0

- ``fpn``: ``fcos`` (the hand-designed FPN of FCOS), ``fcos-deform`` (the same FPN with its
  1x1 laterals and 3x3 output convs modulated deformable: Deformable-FPN-FCOS, §4.4.2) or
  7 blocks ``[id1,id2,op1,op2,agg]`` (§3.2.1). Pool indices 0-3 are C2-C5 (adapted to the FPN width), 4+ the
  outputs of earlier blocks. Ops index :data:`FPN_OPS`, aggregations :data:`AGGS`.
- ``head``: ``fcos`` (4 conv3x3+GN per tower, the FCOS head), ``seq[o0,..,o5]``
  (the sequential head of the released model: 6 ops indexing :data:`HEAD_OPS`)
  or ``dag[o0][id1,id2,op1,op2,agg]x5`` written out as
  ``dag[o0][..][..][..][..][..]`` (§3.2.2: an op on p, then 5 blocks whose op
  outputs and aggregation all join the pool; pool 0 = p, 1 = o0, block t adds
  3 entries; the head's output is the last aggregation).
- ``share``: the head layer from which weights are shared across P3-P7 (§3.2.3);
  layers before it get one copy per level. Layers are the 6 ops of a ``seq``
  head, op0 + 5 blocks of a ``dag`` head, the 4 convs of the ``fcos`` head.

Token sequences (:class:`TokenSpace`): the 7 FPN blocks (35 tokens), then the head,
either ``seq`` (6 op tokens, the released code's head search and the default) or
``dag`` (op0 + 5 blocks, the paper text's §3.2.2), then the sharing index.

FPN validity: the block outputs that no later block reads are collected; the
last three become P5, P4, P3 and the others are added to all three (eq. 1), so
an FPN needs at least 3 unread block outputs, i.e. later blocks may read at
most 4 distinct block outputs. :meth:`TokenSpace.mask` enforces that while
sampling, so every sampled sequence is a valid arch.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

# Table 1 (FPN unary ops) - the order is the released genotype's indexing.
FPN_OPS: tuple[str, ...] = ("sep_conv_3x3", "sep_conv_3x3_dil3", "sep_conv_5x5_dil6", "skip_connect", "def_conv_3x3")
# §3.2.2 head ops (released genotype order).
HEAD_OPS: tuple[str, ...] = ("conv1x1", "conv3x3", "sep_conv_3x3", "sep_conv_3x3_dil3", "skip_connect", "def_conv_3x3")
AGGS: tuple[str, ...] = ("psum", "cat")
# The hand-designed FPNs' ``fpn=`` text, by ``Arch.deform_fpn``.
HAND_FPNS: dict[bool, str] = {False: "fcos", True: "fcos-deform"}

NUM_BACKBONE_INPUTS = 4  # C2, C3, C4, C5
NUM_FPN_BLOCKS = 7
NUM_HEAD_BLOCKS = 5
FCOS_HEAD_LAYERS = 4
NUM_SEQ_HEAD_LAYERS = 6  # the released head search (R_50_NAS_head.yaml)
# Head search spaces: the paper text's DAG head (§3.2.2) or the released sequential head.
# Default: seq, the space that produced the published nas-fcos head and every number the
# paper reports for it (Tables 2 and 3); docs/fidelity.md says why.
HEAD_SEARCH_SPACES: tuple[str, ...] = ("seq", "dag")
DEFAULT_HEAD_SEARCH = "seq"
MAX_READ_BLOCK_OUTPUTS = NUM_FPN_BLOCKS - 3  # >= 3 unread outputs for P3, P4, P5


class ArchError(ValueError):
    """An invalid architecture; the message names the bad token."""


@dataclass(frozen=True)
class Block:
    """Basic block (Fig. 1): ``agg(op1(pool[id1]), op2(pool[id2]))``; ops/agg are indices."""

    id1: int
    id2: int
    op1: int
    op2: int
    agg: int

    def __str__(self) -> str:
        return f"[{self.id1},{self.id2},{self.op1},{self.op2},{self.agg}]"

    def as_list(self) -> list[int]:
        return [self.id1, self.id2, self.op1, self.op2, self.agg]


@dataclass(frozen=True)
class Head:
    """A prediction head: ``kind`` is ``fcos``, ``seq`` (ops) or ``dag`` (op0 = ops[0], blocks)."""

    kind: str
    ops: tuple[int, ...] = ()
    blocks: tuple[Block, ...] = ()

    @property
    def num_layers(self) -> int:
        if self.kind == "fcos":
            return FCOS_HEAD_LAYERS
        if self.kind == "seq":
            return len(self.ops)
        return 1 + len(self.blocks)

    def __str__(self) -> str:
        if self.kind == "fcos":
            return "fcos"
        if self.kind == "seq":
            return "seq[" + ",".join(map(str, self.ops)) + "]"
        return f"dag[{self.ops[0]}]" + "".join(map(str, self.blocks))


@dataclass(frozen=True)
class FPNWiring:
    """What an FPN genotype implies: pool indices feeding P3/P4/P5 and the global features."""

    p3: int
    p4: int
    p5: int
    extra: tuple[int, ...]


def fpn_wiring(blocks: Sequence[Block]) -> FPNWiring:
    """P3/P4/P5 and global-feature pool indices (§3.2.1): the block outputs no later
    block reads, in order; the last three are P5, P4, P3, the rest go to all three."""
    read = {i for blk in blocks for i in (blk.id1, blk.id2)}
    unread = [NUM_BACKBONE_INPUTS + b for b in range(len(blocks)) if NUM_BACKBONE_INPUTS + b not in read]
    if len(unread) < 3:
        raise ArchError(f"fpn: only {len(unread)} block outputs are unread by later blocks; P3, P4 and P5 need 3")
    return FPNWiring(p3=unread[-1], p4=unread[-2], p5=unread[-3], extra=tuple(unread[:-3]))


@dataclass(frozen=True)
class Arch:
    """A decoder: FPN (``None`` = the FCOS FPN, else 7 blocks), head, sharing index.

    ``deform_fpn`` (only with ``fpn=None``) makes the FCOS FPN deformable, the paper's
    Deformable-FPN-FCOS baseline; a flag rather than a new ``fpn`` value so that every
    ``fpn is None`` test (hand-designed FPN: no blocks, no tokens) still holds for it.
    Validated on construction; ``str(arch)`` is the canonical form and
    ``arch.arch_id`` its stable 12-hex-digit hash.
    """

    fpn: tuple[Block, ...] | None
    head: Head
    share: int = 0
    deform_fpn: bool = False
    _id: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        self.validate()
        object.__setattr__(self, "_id", hashlib.sha1(str(self).encode()).hexdigest()[:12])

    # ------------------------------------------------------------- identity
    def __str__(self) -> str:
        fpn = HAND_FPNS[self.deform_fpn] if self.fpn is None else "".join(map(str, self.fpn))
        return f"fpn={fpn};head={self.head};share={self.share}"

    @property
    def arch_id(self) -> str:
        return self._id

    # ------------------------------------------------------------- columns
    def columns(self) -> dict[str, Any]:
        """The arch's analysis columns in ``results.parquet`` (``storage.results.DECODED_FIELDS``):
        op and aggregation names, pool ids and counts, so the table can be queried with
        pandas alone (``df.groupby("n_deform_fpn")``). The row's writer adds them; storage
        does not know the search space."""
        fpn, h = self.fpn or (), self.head
        fpn_ops = [FPN_OPS[op] for b in fpn for op in (b.op1, b.op2)]
        fpn_aggs = [AGGS[b.agg] for b in fpn]
        # seq: its ops; dag: op0, then op1 and op2 of each block
        head_ops = [HEAD_OPS[op] for op in h.ops] + [HEAD_OPS[op] for b in h.blocks for op in (b.op1, b.op2)]
        head_aggs = [AGGS[b.agg] for b in h.blocks]
        return {
            "fpn_kind": HAND_FPNS[self.deform_fpn] if self.fpn is None else "searched",
            "fpn_ops": fpn_ops,
            "fpn_aggs": fpn_aggs,
            "fpn_inputs": [i for b in fpn for i in (b.id1, b.id2)],
            "head_kind": h.kind,
            "head_ops": head_ops,
            "head_aggs": head_aggs,
            "head_inputs": [i for b in h.blocks for i in (b.id1, b.id2)],
            "head_layers": h.num_layers,
            "share": self.share,
            "n_deform_fpn": fpn_ops.count("def_conv_3x3"),
            "n_skip_fpn": fpn_ops.count("skip_connect"),
            "n_cat_fpn": fpn_aggs.count("cat"),
            "n_deform_head": head_ops.count("def_conv_3x3"),
            "n_skip_head": head_ops.count("skip_connect"),
            "n_cat_head": head_aggs.count("cat"),
        }

    # ----------------------------------------------------------- validation
    def validate(self) -> None:
        """Raise :class:`ArchError` naming the first bad token."""
        if not isinstance(self.deform_fpn, bool):
            raise ArchError(f"deform_fpn: {self.deform_fpn!r} is not a bool")
        if self.deform_fpn and self.fpn is not None:
            raise ArchError(f"fpn: only the FCOS FPN can be made deformable ({HAND_FPNS[True]}), not searched blocks")
        if self.fpn is not None:
            if len(self.fpn) != NUM_FPN_BLOCKS:
                raise ArchError(f"fpn: expected {NUM_FPN_BLOCKS} blocks, got {len(self.fpn)}")
            for b, blk in enumerate(self.fpn):
                _check_block(blk, f"fpn block {b}", NUM_BACKBONE_INPUTS + b, FPN_OPS)
            read = {i for blk in self.fpn for i in (blk.id1, blk.id2) if i >= NUM_BACKBONE_INPUTS}
            if len(read) > MAX_READ_BLOCK_OUTPUTS:
                raise ArchError(f"fpn: only {NUM_FPN_BLOCKS - len(read)} block outputs are unread by later blocks; P3, P4 and P5 need at least 3")
        h = self.head
        if h.kind == "fcos":
            if h.ops or h.blocks:
                raise ArchError("head: 'fcos' takes no ops or blocks")
        elif h.kind == "seq":
            if not h.ops or h.blocks:
                raise ArchError("head: 'seq' needs a list of ops and no blocks")
            for i, op in enumerate(h.ops):
                _check_index(op, len(HEAD_OPS), f"head op {i}", HEAD_OPS)
        elif h.kind == "dag":
            if len(h.ops) != 1 or len(h.blocks) != NUM_HEAD_BLOCKS:
                raise ArchError(f"head: 'dag' needs 1 op and {NUM_HEAD_BLOCKS} blocks")
            _check_index(h.ops[0], len(HEAD_OPS), "head op 0", HEAD_OPS)
            for t, blk in enumerate(h.blocks):
                _check_block(blk, f"head block {t}", 2 + 3 * t, HEAD_OPS)
        else:
            raise ArchError(f"head: unknown kind {h.kind!r} (fcos, seq, dag)")
        if not isinstance(self.share, int) or not 0 <= self.share <= h.num_layers:
            raise ArchError(f"share: {self.share!r} not in 0..{h.num_layers} for a {h.kind} head")

    # -------------------------------------------------------------- wiring
    def fpn_wiring(self) -> FPNWiring:
        if self.fpn is None:
            raise ArchError("fpn: the FCOS FPN has no block wiring")
        return fpn_wiring(self.fpn)

    # ------------------------------------------------------------ parsing
    @classmethod
    def parse(cls, text: str) -> "Arch":
        """Canonical string (or a preset name) -> Arch; errors name the bad token."""
        return cls._parse(text.strip())

    @classmethod
    @functools.lru_cache(maxsize=16384)  # noqa: B019 - a search parses each arch ~4 times (0.2 ms each); Arch is frozen
    def _parse(cls, text: str) -> "Arch":
        if text in PRESETS:
            return PRESETS[text]
        if "=" not in text:
            raise ArchError(f"{text!r} is not a preset ({', '.join(PRESETS)}) nor an arch string fpn=...;head=...;share=N")
        parts = dict(_split_field(p, text) for p in text.split(";"))
        missing = {"fpn", "head", "share"} - set(parts)
        if missing:
            raise ArchError(f"{text!r}: missing field(s) {sorted(missing)} (or not a preset: {', '.join(PRESETS)})")
        extra = set(parts) - {"fpn", "head", "share"}
        if extra:
            raise ArchError(f"{text!r}: unknown field(s) {sorted(extra)}")
        hand = {name: deform for deform, name in HAND_FPNS.items()}
        fpn = None if parts["fpn"] in hand else tuple(_blocks(parts["fpn"], "fpn"))
        head = _parse_head(parts["head"])
        try:
            share = int(parts["share"])
        except ValueError:
            raise ArchError(f"share: {parts['share']!r} is not an integer") from None
        return cls(fpn=fpn, head=head, share=share, deform_fpn=hand.get(parts["fpn"], False))

    # ------------------------------------------------------------ tokens
    def tokens(self) -> list[int]:
        """The controller's token sequence: FPN blocks, then the head (``dag`` or 6-op
        ``seq``), then the sharing index (see :class:`TokenSpace`)."""
        if self.fpn is None or self.head.kind not in TOKEN_SPACES:
            raise ArchError(f"{self}: only searched archs (fpn blocks + a dag or seq head) have a token sequence")
        return TOKEN_SPACES[self.head.kind].encode(self)

    @classmethod
    def from_tokens(cls, tokens: Sequence[int], head: str = DEFAULT_HEAD_SEARCH) -> "Arch":
        return token_space(head).decode(tokens)

    @classmethod
    def random(cls, rng: np.random.Generator, head: str = DEFAULT_HEAD_SEARCH) -> "Arch":
        """Uniform choice at each token among the valid ones (the random-search baseline)."""
        space = token_space(head)
        tokens: list[int] = []
        for _ in space.tokens:
            tokens.append(int(rng.choice(np.flatnonzero(space.mask(tokens)))))
        return space.decode(tokens)


@dataclass(frozen=True)
class Token:
    """One controller decision: its name (e.g. ``fpn3.op1``) and number of choices."""

    name: str
    choices: int


class TokenSpace:
    """The sequence of decisions of a searched arch and their validity masks.

    ``head`` picks the head search space: ``dag`` (the paper's text, §3.2.2: op0 and
    5 blocks, 26 tokens) or ``seq`` (the released code's head search,
    ``R_50_NAS_head.yaml``: 6 sequential ops, the space the published ``nas-fcos``
    head ``seq[5,1,5,0,4,4]`` was found in). Both end with the sharing index.
    """

    def __init__(self, head: str = DEFAULT_HEAD_SEARCH, ops: Sequence[str] | None = None) -> None:
        if head not in HEAD_SEARCH_SPACES:
            raise ValueError(f"head search space {head!r} is not one of {HEAD_SEARCH_SPACES}")
        self.head = head
        # ``ops``: the op names that may be chosen (None: all of Table 1 and the head ops);
        # e.g. without def_conv_3x3 for a CPU search, whose deformable convs are slow there
        self.ops = None if ops is None else tuple(ops)
        if self.ops is not None:
            unknown = sorted(set(self.ops) - set(FPN_OPS) - set(HEAD_OPS))
            if unknown:
                raise ValueError(f"ops: {', '.join(unknown)} not among {', '.join(dict.fromkeys(FPN_OPS + HEAD_OPS))}")
            for where, table in (("FPN", FPN_OPS), ("head", HEAD_OPS)):
                if not set(table) & set(self.ops):
                    raise ValueError(f"ops: none of the {where} ops ({', '.join(table)}) is allowed")
        self._allowed = {part: np.array([self.ops is None or o in self.ops for o in table]) for part, table in (("fpn", FPN_OPS), ("head", HEAD_OPS))}
        toks: list[Token] = []
        for b in range(NUM_FPN_BLOCKS):
            pool = NUM_BACKBONE_INPUTS + b
            toks += [Token(f"fpn{b}.id1", pool), Token(f"fpn{b}.id2", pool)]
            toks += [Token(f"fpn{b}.op1", len(FPN_OPS)), Token(f"fpn{b}.op2", len(FPN_OPS)), Token(f"fpn{b}.agg", len(AGGS))]
        if head == "dag":
            toks.append(Token("head.op0", len(HEAD_OPS)))
            for t in range(NUM_HEAD_BLOCKS):
                pool = 2 + 3 * t
                toks += [Token(f"head{t}.id1", pool), Token(f"head{t}.id2", pool)]
                toks += [Token(f"head{t}.op1", len(HEAD_OPS)), Token(f"head{t}.op2", len(HEAD_OPS)), Token(f"head{t}.agg", len(AGGS))]
            layers = 1 + NUM_HEAD_BLOCKS
        else:
            toks += [Token(f"head.op{i}", len(HEAD_OPS)) for i in range(NUM_SEQ_HEAD_LAYERS)]
            layers = NUM_SEQ_HEAD_LAYERS
        toks.append(Token("share", 1 + layers))
        self.tokens: tuple[Token, ...] = tuple(toks)
        self.max_choices = max(t.choices for t in toks)

    def mask(self, prefix: Sequence[int]) -> np.ndarray:
        """Valid choices (bool, length ``max_choices``) for the token after ``prefix``.

        FPN id tokens may not make later blocks read a 5th distinct block output
        (at least 3 must stay unread for P3-P5); op tokens allow the space's ``ops``;
        every other token allows all of its choices.
        """
        i = len(prefix)
        tok = self.tokens[i]
        mask = np.zeros(self.max_choices, dtype=bool)
        mask[: tok.choices] = True
        if self.ops is not None and re.search(r"\.op\d$", tok.name):
            mask[: tok.choices] = self._allowed["fpn" if tok.name.startswith("fpn") else "head"]
        if tok.name.startswith("fpn") and tok.name.endswith((".id1", ".id2")):
            read = {v for k, v in enumerate(prefix) if self.tokens[k].name.startswith("fpn") and self.tokens[k].name.endswith((".id1", ".id2")) and v >= NUM_BACKBONE_INPUTS}
            if len(read) >= MAX_READ_BLOCK_OUTPUTS:
                for j in range(NUM_BACKBONE_INPUTS, tok.choices):
                    mask[j] = j in read
        return mask

    def encode(self, arch: "Arch") -> list[int]:
        """Arch -> tokens; the arch's head must be of this space's kind and size."""
        h = arch.head
        if arch.fpn is None or h.kind != self.head or (h.kind == "seq" and len(h.ops) != NUM_SEQ_HEAD_LAYERS):
            raise ArchError(f"{arch}: not in the {self.head!r} head search space (fpn blocks + {self._head_text()})")
        seq = [v for blk in arch.fpn for v in blk.as_list()]
        if h.kind == "dag":
            seq.append(h.ops[0])
            seq += [v for blk in h.blocks for v in blk.as_list()]
        else:
            seq += list(h.ops)
        seq.append(arch.share)
        if self.ops is not None:  # e.g. an evolution warm start from a run over all ops
            for k, tok in enumerate(self.tokens):
                if not self.mask(seq[:k])[seq[k]]:
                    raise ArchError(f"{arch}: {tok.name}={seq[k]} is outside this space (ops {', '.join(self.ops)})")
        return seq

    def decode(self, tokens: Sequence[int]) -> "Arch":
        """Tokens -> Arch (validated)."""
        if len(tokens) != len(self.tokens):
            raise ArchError(f"tokens: expected {len(self.tokens)} for the {self.head!r} head space, got {len(tokens)}")
        t = [int(v) for v in tokens]
        n = 5 * NUM_FPN_BLOCKS
        fpn = tuple(Block(*t[i : i + 5]) for i in range(0, n, 5))
        if self.head == "dag":
            blocks = tuple(Block(*t[i : i + 5]) for i in range(n + 1, n + 1 + 5 * NUM_HEAD_BLOCKS, 5))
            head = Head("dag", (t[n],), blocks)
        else:
            head = Head("seq", tuple(t[n : n + NUM_SEQ_HEAD_LAYERS]))
        return Arch(fpn=fpn, head=head, share=t[-1])

    def _head_text(self) -> str:
        return f"dag[op0] + {NUM_HEAD_BLOCKS} blocks" if self.head == "dag" else f"seq of {NUM_SEQ_HEAD_LAYERS} ops"


TOKEN_SPACES: dict[str, TokenSpace] = {h: TokenSpace(h) for h in HEAD_SEARCH_SPACES}
TOKEN_SPACE = TOKEN_SPACES[DEFAULT_HEAD_SEARCH]


def token_space(head: "str | TokenSpace", ops: Sequence[str] | None = None) -> TokenSpace:
    """The token space of head search space ``head`` (``dag`` or ``seq``), with only
    ``ops`` allowed when given; a TokenSpace is returned as it is."""
    if isinstance(head, TokenSpace):
        return head
    if ops is not None:
        return TokenSpace(head, ops)
    if head not in TOKEN_SPACES:
        raise ValueError(f"head search space {head!r} is not one of {HEAD_SEARCH_SPACES}")
    return TOKEN_SPACES[head]


def _check_index(v: object, n: int, where: str, names: Sequence[str] | None = None) -> None:
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or not 0 <= v < n:
        hint = f" ({', '.join(f'{i} {s}' for i, s in enumerate(names))})" if names else ""
        raise ArchError(f"{where}: {v!r} not in 0..{n - 1}{hint}")


def _check_block(blk: Block, where: str, pool: int, ops: Sequence[str]) -> None:
    _check_index(blk.id1, pool, f"{where} id1")
    _check_index(blk.id2, pool, f"{where} id2")
    _check_index(blk.op1, len(ops), f"{where} op1", ops)
    _check_index(blk.op2, len(ops), f"{where} op2", ops)
    _check_index(blk.agg, len(AGGS), f"{where} agg", AGGS)


def _split_field(part: str, text: str) -> tuple[str, str]:
    if "=" not in part:
        raise ArchError(f"{text!r}: field {part!r} is not key=value")
    k, v = part.split("=", 1)
    return k.strip(), v.strip()


_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


def _int_list(body: str, where: str) -> list[int]:
    try:
        return [int(x) for x in body.split(",")]
    except ValueError:
        raise ArchError(f"{where}: [{body}] is not a list of integers") from None


def _blocks(text: str, where: str) -> list[Block]:
    groups = _BRACKETS.findall(text)
    if "".join(f"[{g}]" for g in groups) != text.replace(" ", ""):
        raise ArchError(f"{where}: {text!r} is not a sequence of [id1,id2,op1,op2,agg] blocks")
    blocks = []
    for b, g in enumerate(groups):
        vals = _int_list(g, f"{where} block {b}")
        if len(vals) != 5:
            raise ArchError(f"{where} block {b}: [{g}] needs 5 values id1,id2,op1,op2,agg")
        blocks.append(Block(*vals))
    return blocks


def _parse_head(text: str) -> Head:
    if text == "fcos":
        return Head("fcos")
    if text.startswith("seq[") and text.endswith("]"):
        return Head("seq", tuple(_int_list(text[4:-1], "head seq")))
    if text.startswith("dag["):
        m = re.match(r"dag\[(\d+)\](.*)$", text)
        if not m:
            raise ArchError(f"head: {text!r} should be dag[op0][..]x{NUM_HEAD_BLOCKS}")
        return Head("dag", (int(m.group(1)),), tuple(_blocks(m.group(2), "head")))
    raise ArchError(f"head: {text!r} is not fcos, seq[...] or dag[...]")


# §4.3 / released configs: the discovered FPN (Fig. 4) and sequential head.
_NAS_FPN = tuple(Block(*b) for b in ([3, 3, 4, 4, 1], [3, 3, 4, 4, 1], [4, 3, 4, 3, 1], [1, 3, 4, 3, 1], [5, 3, 4, 4, 1], [4, 7, 4, 4, 1], [7, 2, 4, 4, 1]))
# deformable-fpn-fcos: §4.4.2 / Table 2's Deformable-FPN-FCOS, as the released
# R-50-Deformable_FPN-DENSEBOX backbone builds it (docs/fidelity.md).
PRESETS: dict[str, Arch] = {
    "fpn-fcos": Arch(fpn=None, head=Head("fcos"), share=0),
    "nas-fcos-fpn": Arch(fpn=_NAS_FPN, head=Head("fcos"), share=0),
    "nas-fcos": Arch(fpn=_NAS_FPN, head=Head("seq", (5, 1, 5, 0, 4, 4)), share=0),
    "deformable-fpn-fcos": Arch(fpn=None, head=Head("fcos"), share=0, deform_fpn=True),
}


def resolve(arch: "Arch | str") -> Arch:
    """An Arch, a canonical string or a preset name -> Arch."""
    return arch if isinstance(arch, Arch) else Arch.parse(arch)
