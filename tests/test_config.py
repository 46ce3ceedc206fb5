"""Pipeline config (presets, overrides, errors naming the field) and run-dir manifests."""

import json

import pytest

from flows.config import ConfigError, load_config
from storage.run_dir import RunDir, config_hash


def test_presets_carry_the_papers_numbers():
    paper = load_config("paper")
    assert (paper.features.train_size, paper.features.crop) == (4000, 384)
    assert (paper.proxy.width, paper.proxy.lr, paper.proxy.batch_size, paper.proxy.epochs, paper.proxy.ema_decay) == (64, 8e-4, 200, 15, 0.9)
    assert (paper.search.total_archs, paper.select.top_k) == (2800, 20)
    assert (paper.finetune.iterations, paper.finetune.batch_size, paper.finetune.steps) == (30000, 24, (18000, 24000))
    assert (paper.train_full.iterations, paper.train_full.batch_size, paper.train_full.steps) == (90000, 16, (60000, 80000))
    demo = load_config("demo")
    assert demo.data.kind == "synthetic" and demo.execution.devices == ("cpu", "cpu")
    assert demo.search.total_archs >= 16 and demo.train_full.num_archs >= 1 and demo.train_full.baselines == ("fpn-fcos",)
    assert load_config("paper").finetune.devices == 1
    # a killed full-training job loses at most one checkpoint interval: <= 2 % of the iterations
    for c in (paper, demo):
        assert c.train_full.checkpoint_every <= 0.02 * c.train_full.iterations and c.train_full.jobs == "train-arch/local"
    with pytest.raises(ValueError, match="finetune.devices 3 is more than the 2 execution.devices"):
        load_config("demo", {"finetune.devices": 3})
    with pytest.raises(ValueError, match="finetune.batch_size 15 is not divisible by finetune.devices 2"):
        load_config("demo", {"finetune.devices": 2, "finetune.batch_size": 15})


def test_overrides_and_errors_name_the_field(tmp_path):
    cfg = load_config("demo", {"search.total_archs": 64, "execution.devices": ["cuda:0", "cuda:1"]})
    assert cfg.search.total_archs == 64 and cfg.execution.devices == ("cuda:0", "cuda:1")
    with pytest.raises(ConfigError, match=r"demo.yaml: search.total_archs: .*greater than or equal to 1"):
        load_config("demo", {"search.total_archs": 0})
    with pytest.raises(ConfigError, match=r"proxy.widht: Extra inputs"):
        load_config("demo", {"proxy.widht": 32})
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_id: x\nsearch: {policy: genetic}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: search.policy"):
        load_config(str(bad))
    bad.write_text("run_id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: invalid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_manifests_decide_what_is_done(tmp_path):
    run = RunDir.at(tmp_path, "r1")
    h = config_hash({"b": 1, "a": [1, 2]})
    assert h == config_hash({"a": [1, 2], "b": 1})  # key order does not matter
    assert not run.is_done("search", h)
    run.finish("search", h, {"unique_archs": 4})
    assert run.is_done("search", h) and not run.is_done("search", config_hash({"a": 2}))
    assert run.manifest("search")["outputs"] == {"unique_archs": 4}
    assert "torch" in run.manifest("search")["versions"]
    with pytest.raises(ValueError, match="unknown stage"):
        run.manifest_path("train")
    with pytest.raises(ValueError, match="run_id"):
        RunDir.at(tmp_path, "../escape")


def test_a_run_dir_refuses_files_from_another_config(tmp_path):
    from flows.stages import conflict_fields, conflict_key, stage_hash

    a = load_config("demo", {"runs_dir": str(tmp_path)})
    more = load_config("demo", {"runs_dir": str(tmp_path), "search.total_archs": 64})
    other = load_config("demo", {"runs_dir": str(tmp_path), "proxy.epochs": 7})
    # a bigger budget re-runs the search (new stage hash) but may extend its files (same key)
    assert stage_hash(a, "search") != stage_hash(more, "search")
    assert conflict_key(a, "search") == conflict_key(more, "search")
    assert conflict_key(a, "search") != conflict_key(other, "search")
    assert conflict_key(a, "finetune-backbone") == conflict_key(other, "finetune-backbone")
    run = RunDir.at(tmp_path, "demo")
    run.claim("search", conflict_fields(a, "search"))
    run.claim("search", conflict_fields(more, "search"))
    with pytest.raises(ValueError, match=r"stage search has files made with another config \(proxy.epochs 4 -> 7\); change them back"):
        run.claim("search", conflict_fields(other, "search"))


def test_paper_finetunes_from_fcos_coco_and_trains_coco_from_imagenet():
    from torchvision.models import get_weight

    paper = load_config("paper")
    # §4.1: the backbone starts from the FCOS implementation's COCO-trained weights
    assert paper.finetune.weights == "FCOS_ResNet50_FPN_Weights.COCO_V1"
    # §4.2: COCO training starts from ImageNet, never from COCO-trained weights
    assert paper.train_full.weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert not paper.train_full.init_from_finetuned
    for name in (paper.finetune.weights, paper.train_full.weights):
        get_weight(name)  # a real torchvision weight name


def test_full_training_reads_its_own_weights_never_finetunes(tmp_path):
    from flows.stages import stage_hash
    from flows.train_full import initial_weights

    run = RunDir.at(tmp_path, "demo")
    leak = {"runs_dir": str(tmp_path), "finetune.weights": "FCOS_ResNet50_FPN_Weights.COCO_V1", "train_full.init_from_finetuned": False}
    assert initial_weights(load_config("demo", leak), run) == (None, None)
    own = load_config("demo", {**leak, "train_full.weights": "ResNet50_Weights.IMAGENET1K_V1"})
    assert initial_weights(own, run) == ("ResNet50_Weights.IMAGENET1K_V1", None)
    finetuned = load_config("demo", {**leak, "train_full.weights": "ResNet50_Weights.IMAGENET1K_V1", "train_full.init_from_finetuned": True})
    assert initial_weights(finetuned, run) == (None, run.backbone / "checkpoint.pt")
    # other full-training weights are another full training
    assert stage_hash(own, "train-full") != stage_hash(load_config("demo", leak), "train-full")


def test_search_head_space_update_schedule_and_proxy_range_scale():
    """Fidelity fields: the released seq head space by default, [14]'s buffer schedule on
    request, proxy size ranges scaled by crop/800 unless a scale is given."""
    paper = load_config("paper")
    assert paper.search.head == "seq" and paper.proxy.size_range_scale is None
    assert paper.search.controller_update in ("batch", "buffer")
    cfg = load_config("demo", {"search.head": "dag", "search.controller_update": "buffer", "proxy.size_range_scale": 1.0})
    assert (cfg.search.head, cfg.search.controller_update, cfg.proxy.size_range_scale) == ("dag", "buffer", 1.0)
    with pytest.raises(ConfigError, match=r"search.head"):
        load_config("demo", {"search.head": "tree"})
    with pytest.raises(ConfigError, match=r"proxy.size_range_scale"):
        load_config("demo", {"proxy.size_range_scale": 0})


def test_execution_slots_and_dask_devices_name_the_field():
    cfg = load_config("demo", {"execution.devices": ["cuda:0", "cuda:1"], "execution.slots_per_device": 2})
    assert cfg.execution.slots_per_device == 2 and load_config("demo").execution.slots_per_device == 1
    with pytest.raises(ConfigError, match=r"execution.slots_per_device"):
        load_config("demo", {"execution.slots_per_device": 0})
    # a local Dask cluster: one worker per entry, each pinned to cuda:N (a GPU listed twice: two workers)
    dask = {"execution.task_runner": "dask"}
    assert load_config("demo", {**dask, "execution.devices": ["cuda:0", "cuda:1", "cuda:1"]}).execution.devices[2] == "cuda:1"
    assert load_config("demo", {**dask, "execution.devices": ["cpu", "cpu"]}).execution.devices == ("cpu", "cpu")
    for devices in (["cuda"], ["cuda:0", "cpu"]):
        with pytest.raises(ConfigError, match=r"execution: .*devices: .*cuda:N .* or cpu"):
            load_config("demo", {**dask, "execution.devices": devices})
    # hand-started workers each own one device and call it by one name
    assert load_config("demo", {**dask, "execution.dask_address": "tcp://h:8786", "execution.devices": ["cuda"]}).execution.devices == ("cuda",)
    with pytest.raises(ConfigError, match=r"execution: .*devices: with dask_address"):
        load_config("demo", {**dask, "execution.dask_address": "tcp://h:8786", "execution.devices": ["cuda:0", "cuda:1"]})
    with pytest.raises(ConfigError, match=r"execution.dask_workers: Extra inputs"):  # one worker per device now
        load_config("demo", {**dask, "execution.dask_workers": 2})


def test_devices_per_arch_groups_the_devices_and_is_in_no_hash():
    from flows.stages import conflict_key, stage_hash

    four = {"execution.devices": ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]}
    grouped = load_config("demo", {**four, "train_full.devices_per_arch": 2})
    assert grouped.train_full.devices_per_arch == 2 and load_config("demo").train_full.devices_per_arch == 1
    # where an arch trains is not what it computes: same hashes, so a run resumes on groups
    one = load_config("demo", four)
    assert stage_hash(one, "train-full") == stage_hash(grouped, "train-full")
    assert conflict_key(one, "evaluate") == conflict_key(grouped, "evaluate")
    with pytest.raises(ConfigError, match=r"demo.yaml: train_full.devices_per_arch 3 does not divide the 4 execution.devices$"):
        load_config("demo", {**four, "train_full.devices_per_arch": 3})
    with pytest.raises(ConfigError, match=r"train_full.batch_size 6 is not divisible by train_full.devices_per_arch 4"):
        load_config("demo", {**four, "train_full.devices_per_arch": 4, "train_full.batch_size": 6})
    with pytest.raises(ConfigError, match=r"devices_per_arch > 1 needs execution.task_runner 'thread'"):
        load_config("demo", {**four, "train_full.devices_per_arch": 2, "execution.task_runner": "dask"})


def test_a_run_dir_claimed_before_fields_had_roles_still_resumes(tmp_path):
    """Older claims hold only the key over every field (bar total_archs, devices_per_arch):
    the same config resumes (and is re-claimed with its fields), another is refused."""
    import atomicio
    from flows.stages import conflict_fields, legacy_conflict_key

    # the key nasfcos 815f556 claimed the default config's evaluate stage with: a field added
    # to a section since must join flows.stages._NEWER, or older runs stop resuming
    assert legacy_conflict_key(load_config({"run_id": "x"}), "evaluate") == "a8ad76921ef70f7b"
    cfg = load_config("demo", {"runs_dir": str(tmp_path)})
    run = RunDir.at(tmp_path, "demo")
    atomicio.write_json(run.root / "manifests" / "search.claim.json", {"stage": "search", "key": legacy_conflict_key(cfg, "search")})
    run.claim("search", conflict_fields(cfg, "search"), legacy=legacy_conflict_key(cfg, "search"))
    assert "fields" in json.loads((run.root / "manifests" / "search.claim.json").read_text())
    atomicio.write_json(run.root / "manifests" / "search.claim.json", {"stage": "search", "key": "0123456789abcdef"})
    other = load_config("demo", {"runs_dir": str(tmp_path), "proxy.epochs": 9})
    with pytest.raises(ValueError, match="stage search has files from another config"):
        run.claim("search", conflict_fields(other, "search"), legacy=legacy_conflict_key(other, "search"))


def test_preflight_lists_every_missing_path_and_device_in_one_line(tmp_path):
    """Today's failure: COCO paths were checked only when train-full started, after the search."""
    from flows.preflight import PreflightError, preflight

    cfg = load_config("paper", {
        "runs_dir": str(tmp_path), "data.voc_root": str(tmp_path / "VOC2012"), "data.coco_train_json": str(tmp_path / "train.json"),
        "data.coco_train_images": str(tmp_path), "data.coco_val_json": None, "data.coco_val_images": str(tmp_path),
        "data.coco_testdev_json": None, "finetune.weights": "ResNet50_Weights.NOPE",
        "execution.devices": ["cuda:7"],
    })  # fmt: skip
    with pytest.raises(PreflightError) as e:
        preflight(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "6 problems" in msg, msg
    for part in ("train_full.jobs: ", "data.voc_root", "VOC2012 is not a directory", "data.coco_train_json", "train.json does not exist",
                 "data.coco_val_json is required", "finetune.weights: ResNet50_Weights.NOPE", "execution.devices: cuda:7 does not exist"):  # fmt: skip
        assert part in msg, part
    preflight(load_config("demo", {"runs_dir": str(tmp_path), "train_full.jobs": None}))  # nothing outside but its work pool


def test_preflight_checks_the_evolution_warm_start_run(tmp_path):
    """A warm_start path with no results failed only when the search stage started, after
    finetuning and materialising; preflight names it first."""
    from flows.preflight import PreflightError, preflight

    cfg = load_config("demo", {"runs_dir": str(tmp_path), "search.policy": "evolution", "search.warm_start": str(tmp_path / "old")})
    with pytest.raises(PreflightError, match=r"search.warm_start: .*old: no results.parquet"):
        preflight(cfg)


def test_load_config_leaves_the_callers_dict_alone():
    base = load_config("tiny").model_dump(mode="json")
    before = json.dumps(base, sort_keys=True)
    cfg = load_config(base, {"search.total_archs": 99, "proxy.epochs": 3})
    assert cfg.search.total_archs == 99 and json.dumps(base, sort_keys=True) == before


def test_a_checkpoint_save_leaves_no_temp_and_orphans_are_removed(tmp_path):
    import torch

    from nasfcos.engine.checkpoint import remove_orphans, save_checkpoint

    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"x": torch.ones(2)}, path)
    (tmp_path / ".tmp-checkpoint.pt.ab12cd").write_bytes(b"half a checkpoint")  # a process killed mid-save
    (tmp_path / ".tmp-checkpoint.pt2.ab12cd").write_bytes(b"not ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-checkpoint.pt.ab12cd", ".tmp-checkpoint.pt2.ab12cd", "checkpoint.pt"]
    remove_orphans(path)  # the checkpoint's one writer starts again: its temp files go, however young
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-checkpoint.pt2.ab12cd", "checkpoint.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))


def test_the_paper_preset_keeps_its_hashes_as_search_strategies_are_added():
    """Fields added to a section later (flows.stages._NEWER: evolution, successive halving, cost
    limits, ...) are left out of hashes and claims at their defaults: the paper preset still has
    the stage hashes and claim keys of nasfcos b73b858, so its run dirs resume and finished
    stages stay finished; it still searches with the paper's PPO, one fidelity, no cost limit."""
    from flows.stages import conflict_key, stage_hash
    from storage.run_dir import STAGES

    cfg = load_config("paper")
    assert [stage_hash(cfg, s) for s in STAGES] == [
        "308f4022fd0ddf38", "875c7c20ddfa6322", "6991910171f75fd1", "778a77f4f80506d3", "02aa08371420a805", "1ffc24959c74def1",
    ]  # fmt: skip
    assert conflict_key(cfg, "evaluate") == "c8afe19761f41470"
    s = cfg.search
    assert (s.policy, s.controller_update, s.rungs, s.max_decoder_macs, s.max_decoder_params, s.warm_start) == ("ppo", "batch", None, None, None, None)
    # a new field set away from its default is part of the search's identity
    assert stage_hash(load_config("paper", {"search.max_decoder_macs": 10**9}), "search") != stage_hash(cfg, "search")


def test_the_demo_preset_keeps_its_hashes():
    """The demo's stage hashes and claim key as of nasfcos 24a6c26 (before the package
    redesign): a `make demo` run dir made before an upgrade is still finished after it."""
    from flows.stages import conflict_key, stage_hash
    from storage.run_dir import STAGES

    cfg = load_config("demo")
    assert [stage_hash(cfg, s) for s in STAGES] == [
        "33d56c6477c56bf9", "067a8de3235b4c48", "b3e902cc66c8a5a3", "071f54751fade910", "ad43e0257c21dd40", "da01a5b26d0a3840",
    ]  # fmt: skip
    assert conflict_key(cfg, "evaluate") == "90fb2166de02c865"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"search.policy": "evolution", "search.sample_size": 100}, "search.sample_size 100 is larger than search.population 64"),
        ({"search.warm_start": "runs/x/results.parquet"}, "search.warm_start is for policy evolution, not ppo"),
        ({"search.rungs": [2, 1]}, r"search.rungs \[2, 1\]: need at least 2 strictly increasing"),
        ({"search.rungs": [1, 3]}, r"search.rungs \[1, 3\] must end at proxy.epochs \(4\)"),
        ({"search.rungs": [1, 4], "search.mode": "sync"}, r"search.rungs \(successive halving\) needs search.mode async"),
    ],
)
def test_search_strategy_settings_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=f"demo.yaml: {message}"):
        load_config("demo", overrides)


def test_pipeline_defaults_are_the_library_defaults():
    """The paper's numbers live twice, in the pipeline's config sections (flows/config.py) and
    in the nasfcos dataclasses a stage builds from them, so that the library is usable
    without the pipeline; this test ties each pair, so one changed alone fails here."""
    import dataclasses
    import inspect

    from flows.config import FeaturesSection, FinetuneSection, ProxySection, SearchSection, TrainFullSection
    from nasfcos.engine.materialise import PROXY_SIZE, meta_split
    from nasfcos.engine.proxy import ProxyConfig
    from nasfcos.engine.train import SCHEDULES, TrainConfig
    from nasfcos.search.controller import ControllerConfig
    from nasfcos.search.evolution import EvolutionConfig
    from nasfcos.search.loop import SearchConfig

    same = [  # (config section, library dataclass, {section field: dataclass field})
        (ProxySection, ProxyConfig, {f: f for f in ("width", "lr", "batch_size", "epochs", "ema_decay", "seed")}),
        (SearchSection, SearchConfig, {f: f for f in ("total_archs", "archs_per_step", "failure_penalty", "max_consecutive_failures", "max_decoder_params", "max_decoder_macs", "eta")}),
        (SearchSection, ControllerConfig, {"controller_lr": "lr", "ppo_epochs": "ppo_epochs", "controller_update": "update"}),
        (SearchSection, EvolutionConfig, {"population": "population", "sample_size": "sample_size"}),
        (TrainFullSection, TrainConfig, {"iterations": "iterations", "batch_size": "batch_size", "lr": "base_lr", "steps": "steps", "warmup": "warmup_iters",
                                        "min_size": "min_size", "max_size": "max_size", "clip_grad": "clip_grad_norm", "checkpoint_every": "checkpoint_every",
                                        "num_workers": "num_workers"}),
    ]  # fmt: skip
    checked = 0
    for section, lib, pairs in same:
        defaults = {f.name: f.default for f in dataclasses.fields(lib)}
        for ours, theirs in pairs.items():
            assert section.model_fields[ours].default == defaults[theirs], f"{section.__name__}.{ours} vs {lib.__name__}.{theirs}"
            checked += 1
    voc = SCHEDULES["voc-finetune"]  # the finetune section is the library's VOC schedule (§4.1)
    finetune = {"iterations": "iterations", "batch_size": "batch_size", "lr": "base_lr", "steps": "steps", "warmup": "warmup_iters",
                "min_size": "min_size", "max_size": "max_size", "crop": "crop", "clip_grad": "clip_grad_norm"}  # fmt: skip
    for ours, theirs in finetune.items():
        assert FinetuneSection.model_fields[ours].default == getattr(voc, theirs), f"FinetuneSection.{ours} vs voc-finetune {theirs}"
        checked += 1
    assert checked == 37
    assert SearchSection.model_fields["rungs"].default is None and SearchConfig().rungs == ()  # both: one fidelity
    assert FeaturesSection.model_fields["crop"].default == PROXY_SIZE == 384
    assert FeaturesSection.model_fields["train_size"].default == inspect.signature(meta_split).parameters["train_size"].default == 4000
