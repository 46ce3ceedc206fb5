"""The search space: Arch encoding, validation, tokens, presets, wiring."""

import numpy as np
import pytest

from nasfcos.arch import AGGS, FPN_OPS, HEAD_OPS, PRESETS, TOKEN_SPACE, TOKEN_SPACES, Arch, ArchError, Block, Head, resolve
from nasfcos.model.ops import AGG_OPS, OPS


def test_op_table_covers_the_space():
    assert set(FPN_OPS) <= set(OPS) and set(HEAD_OPS) <= set(OPS) and set(AGGS) == set(AGG_OPS)
    # Table 1 order (the released genotype indexes it)
    assert FPN_OPS == ("sep_conv_3x3", "sep_conv_3x3_dil3", "sep_conv_5x5_dil6", "skip_connect", "def_conv_3x3")


@pytest.mark.parametrize("head", ["seq", "dag"])
def test_canonical_string_round_trips_for_1000_random_archs(head):
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(1000):
        a = Arch.random(rng, head=head)
        assert a.head.kind == head
        s = str(a)
        b = Arch.parse(s)
        assert b == a and str(b) == s and b.arch_id == a.arch_id
        assert Arch.from_tokens(a.tokens(), head=head) == a
        seen.add(a.arch_id)
    assert len(seen) == 1000  # the space is large; collisions would hint at a sampling bug


def test_arch_id_is_stable_and_short():
    # sha1 of the canonical string, 12 hex digits: must never change across versions
    # (results.parquet and the run directories key on it), so the values are pinned here.
    assert PRESETS["nas-fcos"].arch_id == "35926031c06a"
    assert PRESETS["nas-fcos-fpn"].arch_id == "14123efbf9c6"
    assert PRESETS["fpn-fcos"].arch_id == "b8394b41e803"


def test_presets_canonical_strings():
    assert str(PRESETS["fpn-fcos"]) == "fpn=fcos;head=fcos;share=0"
    assert str(PRESETS["nas-fcos"]) == ("fpn=[3,3,4,4,1][3,3,4,4,1][4,3,4,3,1][1,3,4,3,1][5,3,4,4,1][4,7,4,4,1][7,2,4,4,1];head=seq[5,1,5,0,4,4];share=0")
    assert PRESETS["nas-fcos-fpn"].fpn == PRESETS["nas-fcos"].fpn and PRESETS["nas-fcos-fpn"].head == Head("fcos")
    assert resolve("nas-fcos") is PRESETS["nas-fcos"]
    assert Arch.parse(" nas-fcos-fpn ") == PRESETS["nas-fcos-fpn"]


def test_deformable_fpn_fcos_preset_round_trips_and_keeps_the_others_ids():
    """Deformable-FPN-FCOS (§4.4.2) is the FCOS FPN with a flag, so ``fpn is None`` (no blocks,
    no tokens) still holds for it; its canonical string and id differ from fpn-fcos's."""
    a = PRESETS["deformable-fpn-fcos"]
    assert str(a) == "fpn=fcos-deform;head=fcos;share=0"
    assert a.arch_id == "a6c7a1a46039"  # pinned like the others: run dirs key on it
    assert Arch.parse(str(a)) == a and resolve("deformable-fpn-fcos") is a
    assert a.fpn is None and a.head == Head("fcos") and a.deform_fpn
    assert a != PRESETS["fpn-fcos"] and not PRESETS["fpn-fcos"].deform_fpn
    assert a.columns()["fpn_kind"] == "fcos-deform" and PRESETS["fpn-fcos"].columns()["fpn_kind"] == "fcos"
    b = Arch.parse("fpn=fcos-deform;head=seq[1,5];share=1")  # any head
    assert b.deform_fpn and str(b) == "fpn=fcos-deform;head=seq[1,5];share=1"
    with pytest.raises(ArchError, match="only the FCOS FPN can be made deformable"):
        Arch(fpn=PRESETS["nas-fcos"].fpn, head=Head("fcos"), deform_fpn=True)
    with pytest.raises(ArchError, match="token sequence"):
        a.tokens()


def test_deformable_fpn_fcos_is_accepted_as_a_train_full_baseline():
    from flows.config import ConfigError, load_config

    cfg = load_config("demo", {"train_full.baselines": ["fpn-fcos", "deformable-fpn-fcos"]})
    assert cfg.train_full.baselines == ("fpn-fcos", "deformable-fpn-fcos")
    with pytest.raises(ConfigError, match="not a preset"):
        load_config("demo", {"train_full.baselines": ["deformable-fpn"]})


def test_nas_fcos_wiring_hand_derived():
    # Pool: 0-3 = C2..C5, block b writes index 4+b. Reads of each block (id1, id2):
    #   b0 -> 4: (3,3)   b1 -> 5: (3,3)   b2 -> 6: (4,3)   b3 -> 7: (1,3)
    #   b4 -> 8: (5,3)   b5 -> 9: (4,7)   b6 -> 10: (7,2)
    # Block outputs read later: 4 (by b2, b5), 5 (b4), 7 (b5, b6). Unread in order: 6, 8, 9, 10.
    # Last three -> P5 = 8, P4 = 9, P3 = 10; the remaining unread output 6 is the global feature (eq. 1).
    w = PRESETS["nas-fcos"].fpn_wiring()
    assert (w.p3, w.p4, w.p5, w.extra) == (10, 9, 8, (6,))
    # C2 (index 0) is never read: the paper's Fig. 4 omits it for that reason.
    assert all(0 not in (b.id1, b.id2) for b in PRESETS["nas-fcos"].fpn)
    # Ops: everything deformable except the skip connections of blocks 2 and 3; all aggregations cat.
    assert [(FPN_OPS[b.op1], FPN_OPS[b.op2]) for b in PRESETS["nas-fcos"].fpn][2] == ("def_conv_3x3", "skip_connect")
    assert {AGGS[b.agg] for b in PRESETS["nas-fcos"].fpn} == {"cat"}
    assert [HEAD_OPS[o] for o in PRESETS["nas-fcos"].head.ops] == [
        "def_conv_3x3", "conv3x3", "def_conv_3x3", "conv1x1", "skip_connect", "skip_connect",
    ]  # fmt: skip


GOOD = PRESETS["nas-fcos"]


@pytest.mark.parametrize(
    "text, token",
    [
        (str(GOOD).replace("[4,3,4,3,1]", "[4,3,9,3,1]"), "fpn block 2 op1"),
        (str(GOOD).replace("[4,3,4,3,1]", "[4,3,4,3,2]"), "fpn block 2 agg"),
        (str(GOOD).replace("[3,3,4,4,1][3,3", "[3,3,4,4,1][5,3", 1), "fpn block 1 id1"),  # pool has 0..4 at block 1
        (str(GOOD).replace("[7,2,4,4,1]", "[7,2,4,4]"), "fpn block 6"),
        (str(GOOD).replace("[7,2,4,4,1]", "[7,x,4,4,1]"), "fpn block 6"),
        (str(GOOD).replace("seq[5,1,5,0,4,4]", "seq[5,1,6,0,4,4]"), "head op 2"),
        (str(GOOD).replace("share=0", "share=7"), "share"),
        (str(GOOD).replace("share=0", "share=a"), "share"),
        (str(GOOD).replace("head=seq", "head=foo"), "head"),
        ("fpn=fcos;head=fcos", "missing field"),
        ("fpn=fcos;head=fcos;share=0;x=1", "unknown field"),
        ("fpn=fcos;head=dag[0][0,1,0,0,0];share=0", "head: 'dag' needs"),
        ("fpn=fcos;head=dag[0][0,1,0,0,0][0,5,0,0,0][0,0,0,0,0][0,0,0,0,0][0,0,0,0,0];share=0", "head block 1 id2"),
        ("nas-fcos-typo", "not a preset"),
    ],
)
def test_invalid_strings_name_the_token(text, token):
    with pytest.raises(ArchError, match=token):
        Arch.parse(text)


def test_fpn_needs_three_unread_outputs():
    # every block reads the previous block's output: only block 6 stays unread
    chain = tuple(Block(3 + b, 3 + b, 0, 0, 0) if b else Block(3, 3, 0, 0, 0) for b in range(7))
    with pytest.raises(ArchError, match="unread"):
        Arch(fpn=chain, head=Head("fcos"))


def test_token_space_masks_make_every_sample_valid():
    dag, seq = TOKEN_SPACES["dag"], TOKEN_SPACES["seq"]
    assert len(dag.tokens) == 7 * 5 + 1 + 5 * 5 + 1
    assert len(seq.tokens) == 7 * 5 + 6 + 1  # released head search: 6 op tokens + the share index
    assert [t.name for t in seq.tokens[35:]] == [f"head.op{i}" for i in range(6)] + ["share"]
    assert all(t.choices == 6 for t in seq.tokens[35:41]) and seq.tokens[-1].choices == 7  # share 0..6
    assert TOKEN_SPACE is seq  # the default, see docs/fidelity.md
    assert dag.tokens[0].name == "fpn0.id1" and dag.tokens[0].choices == 4
    assert dag.tokens[30].name == "fpn6.id1" and dag.tokens[30].choices == 10
    assert dag.tokens[-1].name == "share" and dag.tokens[-1].choices == 7
    # a prefix whose FPN already reads 4 distinct block outputs (4,5,6,7): only C2..C5 or those remain
    prefix = [3, 3, 0, 0, 0, 4, 3, 0, 0, 0, 5, 3, 0, 0, 0, 6, 7, 0, 0, 0]  # blocks 0..3 read 4, 5, 6, 7
    mask = TOKEN_SPACE.mask(prefix)  # block 4 id1: pool 0..7
    assert mask[:8].tolist() == [True] * 8  # 4..7 are already read, so still allowed
    prefix += [7, 3, 0, 0, 0]  # block 4 -> index 8
    mask = TOKEN_SPACE.mask(prefix)  # block 5 id1: 8 would be a 5th distinct read
    assert mask[:9].tolist() == [True] * 8 + [False]


def test_published_nas_fcos_is_in_the_seq_space_and_reachable():
    """The released head search found seq[5,1,5,0,4,4]; the controller must be able to
    sample it: every token allowed by the masks after the tokens before it."""
    a = PRESETS["nas-fcos"]
    tokens = a.tokens()
    assert tokens[35:] == [5, 1, 5, 0, 4, 4, 0]
    space = TOKEN_SPACES["seq"]
    assert all(space.mask(tokens[:i])[v] for i, v in enumerate(tokens))
    assert Arch.from_tokens(tokens, head="seq") == a
    with pytest.raises(ArchError, match="'dag' head search space"):
        TOKEN_SPACES["dag"].encode(a)
    with pytest.raises(ArchError, match="token sequence"):
        Arch(fpn=a.fpn, head=Head("fcos")).tokens()
    with pytest.raises(ArchError, match="seq of 6 ops"):  # a 3-layer seq head is not in the searched space
        TOKEN_SPACES["seq"].encode(Arch(fpn=a.fpn, head=Head("seq", (1, 1, 1))))


def test_head_dag_and_share_validation():
    a = Arch.random(np.random.default_rng(1), head="dag")
    assert a.head.kind == "dag" and a.head.num_layers == 6
    with pytest.raises(ArchError, match="share"):
        Arch(fpn=a.fpn, head=a.head, share=7)
    with pytest.raises(ArchError, match="token sequence"):
        PRESETS["fpn-fcos"].tokens()


def test_search_ops_restrict_every_policy_and_mutation():
    """search.ops (the CPU demo's space without deformable convs): no policy, PPO after
    updates and evolution after mutations included, ever picks a left-out op."""
    from nasfcos.arch import FPN_OPS, HEAD_OPS
    from nasfcos.search.policies import build_policy

    ops = tuple(o for o in dict.fromkeys(FPN_OPS + HEAD_OPS) if o != "def_conv_3x3")
    for kind in ("random", "ppo", "evolution"):
        policy = build_policy(kind, seed=1, head="seq", ops=ops)
        for _ in range(2):
            samples = policy.sample(8)
            for s in samples:
                assert "def_conv" not in " ".join(FPN_OPS[o] for b in s.arch.fpn for o in (b.op1, b.op2)), (kind, s.arch)
                assert "def_conv" not in " ".join(HEAD_OPS[o] for o in s.arch.head.ops), (kind, s.arch)
            policy.update(samples, [float(i) for i in range(len(samples))])


def test_an_evolution_warm_start_keeps_only_archs_of_the_restricted_space():
    """Warm-starting the demo's space (no def_conv_3x3) from a run over all ops: members that
    use a left-out op are skipped, or their children would be sampled outside search.ops."""
    import numpy as np

    from nasfcos.arch import FPN_OPS, HEAD_OPS, ArchError, token_space
    from nasfcos.search.policies import build_policy

    ops = tuple(o for o in dict.fromkeys(FPN_OPS + HEAD_OPS) if o != "def_conv_3x3")
    rng = np.random.default_rng(0)
    restricted = build_policy("random", seed=0, head="seq", ops=ops).sample(20)
    archs = [a for pair in zip([s.arch for s in restricted], [Arch.random(rng, head="seq") for _ in range(20)], strict=True) for a in pair]
    uses = ["def_conv_3x3" in [FPN_OPS[o] for b in a.fpn for o in (b.op1, b.op2)] + [HEAD_OPS[o] for o in a.head.ops] for a in archs]
    assert any(uses) and not all(uses)
    with pytest.raises(ArchError, match="outside this space"):
        token_space("seq", ops).encode(archs[uses.index(True)])
    policy = build_policy("evolution", seed=0, head="seq", ops=ops, warm_start=[(str(a), -float(i)) for i, a in enumerate(archs)])
    kept = {str(token_space("seq", ops).decode(m)) for m in policy.members}
    assert kept and kept <= {str(a) for a, u in zip(archs, uses, strict=True) if not u}
