"""Every experiment composes under every profile; the paper profile builds LLaMA-2-7B on the meta device."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mora.adapters.build import build_adapter
from mora.models import build_model
from mora.paths import CONFIG_DIR
from mora.training.run import validate

EXPERIMENTS = [None] + sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
PROFILES = sorted(p.stem for p in (CONFIG_DIR / "profile").glob("*.yaml"))
ADAPTERS = sorted(p.stem for p in (CONFIG_DIR / "adapter").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONFIG_DIR / "task").glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


# every experiment under each profile it has a grid for (Table 2's regime sweep: tiny only), and none
GRIDS = {e: OmegaConf.load(CONFIG_DIR / "experiment" / f"{e}.yaml").grid for e in EXPERIMENTS[1:]}
RUNNABLE = [(None, p) for p in PROFILES] + [(e, p) for e, grid in GRIDS.items() for p in PROFILES if p in grid]
# the methods PEFT ships (method peft): alone and in the comparison; the paper's methods under every experiment
PEFT_ADAPTERS = [a for a in ADAPTERS if OmegaConf.load(CONFIG_DIR / "adapter" / f"{a}.yaml").method == "peft"]
COMPOSITIONS = [
    (e, p, a) for e, p in RUNNABLE for a in ADAPTERS if a not in PEFT_ADAPTERS or e in (None, "methods")
]  # fmt: skip


@pytest.mark.parametrize(("experiment", "profile", "adapter"), COMPOSITIONS)
def test_every_composition_validates(experiment, profile, adapter):
    overrides = [f"profile={profile}", f"adapter={adapter}"] + ([f"experiment={experiment}"] if experiment else [])
    cfg = _compose(*overrides)
    world = 8 if profile == "paper" else 1
    validate(cfg, world)
    if experiment == "table2":
        names = {"fft", "lora-r8", "mora-r8", "lora-r256", "mora-r256"} | (
            {"mora-r256-decouple"} if profile != "gpu" else set()
        )
        assert {c["name"] for c in cfg.grid[profile]} == names


@pytest.mark.parametrize(
    ("task", "profile"),
    [(t, p) for t in TASKS for p in ("tiny", "paper") if (t, p) != ("uuid_text", "paper")]
    + [("uuid", "gpu"), ("c4", "gpu")],
)  # the gpu profile: Table 2's and Table 3's; uuid_text is the tiny methods comparison's base (the paper's: LLaMA-2-7B)
def test_every_task_has_settings_for_every_profile(task, profile):
    scratch = task == "c4" and profile != "tiny"  # pretraining from scratch names its model (llama_250m / llama_1b)
    cfg = _compose(f"profile={profile}", f"task={task}", *(["model=llama_250m"] if scratch else []))
    validate(cfg, 8 if profile == "paper" else 1)
    assert (CONFIG_DIR / "task_profile" / f"{task}_{profile}.yaml").is_file()
    if task == "c4":  # perplexity on held-out blocks: local corpora on tiny and gpu, C4 on the paper's
        corpus = {"tiny": "python_docs", "gpu": "package_docs", "paper": "allenai/c4"}[profile]
        assert cfg.task.source.path == cfg.task.eval_source.path == corpus
    elif task not in ("uuid", "uuid_text"):
        assert cfg.task.eval.source == ("fixture" if profile == "tiny" else "hub")
        local = cfg.task.source.path == "json"
        assert local if profile == "tiny" else (not local)  # tiny reads our fixtures; paper a hub id or nothing


def test_table2_paper_profile_is_the_papers_setup():
    cfg = _compose("profile=paper", "experiment=table2")
    assert cfg.model.pretrained == "meta-llama/Llama-2-7b-hf" and cfg.model.dtype == "bfloat16"
    assert cfg.task.n_pairs == 10_000 and cfg.train.global_batch == 1000 and cfg.train.steps == 1000
    assert list(cfg.train.eval_steps) == [300, 500, 700, 900]
    lrs = {c["name"]: c["lrs"] for c in cfg.grid.paper}
    assert lrs["fft"] == [3e-5] and lrs["lora-r8"] == [1e-4, 2e-4, 3e-4] and lrs["mora-r256"] == [5e-5, 1e-4, 2e-4]


@pytest.mark.parametrize(
    "adapter,r,compression,trainable",
    [
        ("lora", 8, None, 19_988_480),
        ("mora", 8, "rope", 20_014_592),
        ("lora", 256, None, 639_631_360),
        ("mora", 256, "sharing", 639_433_088),
    ],
)
def test_paper_profile_builds_llama2_7b_on_meta(adapter, r, compression, trainable):
    overrides = ["profile=paper", f"adapter={adapter}", f"adapter.r={r}"]
    if compression:
        overrides.append(f"adapter.compression={compression}")
    cfg = _compose(*overrides)
    model = build_model(cfg.model, meta=True)
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616
    assert build_adapter(model, cfg.adapter).trainable_parameters() == trainable


def test_model_configs_match_the_authors_pretraining_configs():
    for name, hidden, inter in (("llama_250m", 768, 2560), ("llama_1b", 2048, 5461)):
        cfg = _compose(f"model={name}")
        assert cfg.model.config.hidden_size == hidden and cfg.model.config.intermediate_size == inter
        assert cfg.model.config.num_hidden_layers == 24 and cfg.model.config.vocab_size == 32100
    model = build_model(_compose("model=llama_250m").model, meta=True)
    assert 247e6 < sum(p.numel() for p in model.parameters()) < 248e6  # PAPER.md §2.5: ~247.5M


def test_paths_exist():
    assert Path(CONFIG_DIR / "train.yaml").is_file()


def test_the_regime_sweep_moves_both_ratios_towards_the_papers():
    # configs/experiment/table2_regime_*.yaml: wider models with more pairs; at each rank, trainable parameters /
    # bits of the values and pairs / rank both grow from point to point (the paper: 15.6 and 1,250 at r = 8)
    ratios = {"low": [], "high": []}
    for point in ("w64", "w128", "w256"):
        cfg = _compose("profile=tiny", f"experiment=table2_regime_{point}")
        assert [c["name"] for c in cfg.grid.tiny] == ["lora-r8", "mora-r8", "lora-r256", "mora-r256"]
        for level, cell in (("low", cfg.grid.tiny[0]), ("high", cfg.grid.tiny[2])):
            lora = _compose("profile=tiny", f"experiment=table2_regime_{point}", "adapter=lora", f"adapter.r={cell.r}")
            params = build_adapter(build_model(lora.model, meta=True), lora.adapter).trainable_parameters()
            ratios[level].append((params / (cfg.task.n_pairs * 128), cfg.task.n_pairs / cell.r))
    for points in ratios.values():
        for before, after in zip(points, points[1:], strict=False):
            assert after[0] > before[0] and after[1] > before[1]
    assert ratios["low"][-1][0] < 15.6 and ratios["low"][-1][1] < 1250  # towards the paper, not past it


def test_every_task_recipe_names_the_settings_of_its_section():
    # mora.training.run.validate checks `task` against its recipe's Settings (mora.config.check_task)
    from mora.config import TaskSettings
    from mora.tasks import recipe, recipes

    assert recipes()
    for name in recipes():
        assert issubclass(recipe({"recipe": name}).Settings, TaskSettings), name
