"""The dress rehearsal of the GPU profiles (experiments/rehearsal.py, experiments/rehearse.py): a rehearsed run
keeps everything of its profile's code path but the sizes, and CI's subset runs every launcher, every task recipe
and both kinds of restarts, and reads every saved adapter back."""

import json
import re

import pytest
from omegaconf import OmegaConf

from experiments import rehearsal, rehearse, reproduce
from mora.adapters.build import build_adapter
from mora.models import build_model
from mora.training.run import validate

# what a rehearsal must leave as the profile has it: the launcher, the method, the optimizer and schedule shape,
# the precision, the restarts' kind and the evaluation
KEPT = (
    "launcher.name",
    "launcher.num_processes",
    "adapter.method",
    "adapter.compression",
    "adapter.rounding",
    "adapter.regroup",
    "adapter.target_modules",
    "adapter.modules_to_save",
    "adapter.dropout",
    "adapter.loraplus_ratio",
    "adapter.restart.optimizer_reset",
    "train.lr",
    "train.schedule",
    "train.weight_decay",
    "train.max_grad_norm",
    "train.epochs",
    "train.mixed_precision",
    "train.spectrum",
    "model.dtype",
    "model.config.model_type",
    "task.name",
    "task.recipe",
    "task.from_scratch",
    "task.data_seed",
    "task.eval.columns",
    "seed",
)


def _planned(root, one_point=True):
    """Every (table, profile) of the rehearsal: its runs as the runner plans them, before and after shrinking."""
    for table, profile in rehearse.TABLES:
        spec = reproduce.experiment(table, profile)
        todo, base = reproduce.runs(
            table,
            profile,
            [int(rehearse.SEEDS[profile])],
            spec["table"]["tasks"],
            root / table / profile,
            None,
            [],
            one_point,
        )
        launcher = reproduce.DEFAULT_LAUNCHER[profile]
        for run in ([base] if base else []) + todo:
            launch = reproduce.launch_overrides(run, launcher, 2)
            before = reproduce.compose_cfg([*launch, *run.overrides])
            reproduce.rehearse([run], launcher, 2, root / table / profile)
            world = 2 if launch else 1
            yield table, run, world, before, reproduce.compose_cfg([*launch, *run.overrides])


def test_a_rehearsed_run_keeps_its_profiles_code_path_and_shrinks_only_its_sizes(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "REHEARSALS", tmp_path)  # the stand-in models
    seen = set()
    for table, run, world, paper, shrunk in _planned(tmp_path):
        what = f"{table} {run.folder.name}"
        for key in KEPT:
            assert OmegaConf.select(shrunk, key) == OmegaConf.select(paper, key), (what, key)
        m, p = shrunk.model.config, paper.model.config
        assert (m.hidden_size, m.num_hidden_layers) == (rehearsal.WIDTH, rehearsal.LAYERS), what
        assert abs(m.intermediate_size / m.hidden_size - p.intermediate_size / p.hidden_size) < 0.02, what
        t, pt = shrunk.train, paper.train
        accumulation = 2 if pt.global_batch > pt.micro_batch * rehearsal.PAPER_GPUS else 1
        micro = rehearsal.MICRO_BATCH if t.epochs is None else rehearsal.EPOCH_MICRO_BATCH
        assert t.micro_batch == micro and t.global_batch == micro * world * accumulation, what
        if t.epochs is None:  # the schedule's shape inside the run: warmup, evaluations, merges, checkpoints
            assert t.steps == rehearsal.REHEARSAL_STEPS and t.steps in t.eval_steps, what
            assert all(0 <= s <= t.steps for s in t.eval_steps) and (0 in t.eval_steps) == (0 in pt.eval_steps), what
        assert bool(t.warmup) == bool(pt.warmup) and bool(t.checkpoint_every) == bool(pt.checkpoint_every), what
        if shrunk.adapter.get("restart") is not None:
            assert 1 <= shrunk.adapter.restart.every < rehearsal.REHEARSAL_STEPS, what
            assert bool(shrunk.adapter.restart.warmup) == bool(paper.adapter.restart.warmup), what
        if paper.adapter.get("r"):
            r = max(1, round(paper.adapter.r / p.hidden_size * rehearsal.WIDTH))
            k = (paper.adapter.get("args") or {}).get("gralora_k", 1)  # GraLoRA: r a multiple of its k blocks
            assert shrunk.adapter.r == k * -(-r // k), what
        args, shrunk_args = paper.adapter.get("args") or {}, shrunk.adapter.get("args") or {}
        if "r" in args and not OmegaConf.is_interpolation(args, "r"):  # a method's own rank, with the width too
            assert shrunk_args.r == max(1, round(args.r / p.hidden_size * rehearsal.WIDTH)), what
        if "r" in args and "alpha" in args:
            assert shrunk_args.alpha / shrunk_args.r == pytest.approx(args.alpha / args.r), what
        # every method's knobs fit the shrunk model (C3A's blocks divide its layers): the adapter builds (on the CPU:
        # SHiRA's mask cannot be made on the meta device), on the architecture that its stand-in or base would have
        build_adapter(build_model({**shrunk.model, "pretrained": None}), shrunk.adapter)
        if paper.model.get("pretrained") and not str(paper.model.pretrained).startswith(str(tmp_path)):
            assert (tmp_path / "models" / paper.model.name / "config.json").is_file(), what  # the stand-in
        if "columns" in (paper.task.get("eval") or {}):
            assert shrunk.task.eval.source == "fixture" and shrunk.task.eval.limit == rehearsal.EVAL_LIMIT, what
        validate(shrunk, world)
        seen.add((table, shrunk.launcher.name, shrunk.task.get("recipe") or shrunk.task.name))
    launchers = {launcher for _, launcher, _ in seen}
    assert launchers == {"deepspeed_zero2", "ddp", "local"}  # ZeRO-3 by LAUNCHER=deepspeed_zero3 (the quick set)
    assert {recipe for *_, recipe in seen} == {"tulu_v2", "metamath", "cpt", "c4", "uuid"}


def test_hydra_values_compose_back_to_themselves():
    values = {
        "task.source": {"path": "json", "name": None, "split": "train", "data_files": {"train": "a/b c.jsonl"}},
        "train.eval_steps": [3, 5, 10],
        "adapter.alpha": 0.5,
        "task.eval.gen_kwargs": {"max_gen_toks": 64},
        "model.pretrained": "/tmp/a-b/c_d.e",
    }
    overrides = rehearsal.replace(["task=metamath", "train.eval_steps=[1]", "adapter=lora"], values)
    assert sum(o.startswith("train.eval_steps=") for o in overrides) == 1
    cfg = reproduce.compose_cfg(overrides)
    for key, value in values.items():
        got = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(got) if OmegaConf.is_config(got) else got) == value, key


@pytest.mark.parametrize(
    ("args", "named"), [(["--tables", "table9"], "'table9'"), (["--cells", "nope"], "nope"), (["--nproc", "0"], "0")]
)
def test_the_rehearsal_stops_on_a_bad_argument_with_one_line(tmp_path, monkeypatch, capsys, args, named):
    monkeypatch.setattr(reproduce, "REHEARSALS", tmp_path / "rehearsal")
    with pytest.raises(SystemExit) as stopped:
        rehearse.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and named in err[0], err
    assert not (tmp_path / "rehearsal").exists()


@pytest.mark.slow
@pytest.mark.multiprocess
def test_the_quick_rehearsal_runs_every_launcher_recipe_and_restart_and_reloads_every_adapter(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "REHEARSALS", tmp_path)
    assert rehearse.main(["--quick"]) == 0
    quick = tmp_path / "quick"
    report = (quick / "rehearsal.md").read_text().splitlines()
    rows = [line.split(" | ") for line in report if "| paper |" in line or "| gpu |" in line]
    assert len(rows) == 4 and all(r[6] == "finished" and r[7].startswith("same scores") for r in rows), rows
    assert {r[3] for r in rows} == {"ddp", "deepspeed_zero2", "deepspeed_zero3"}
    summaries = [json.loads(f.read_text()) for f in quick.glob("table*/*/**/summary.json")]
    assert {s["task"] for s in summaries} == {"tulu_v2", "metamath", "biomed", "c4"}
    for name in ("relora-r8-lr0.0001-every1000-s42", "remora-250m-lr0.0005-s42"):  # merges inside the run
        metrics = next(quick.glob(f"table*/paper/**/{name}/metrics.jsonl")).read_text()
        assert len(re.findall('"event": "restart"', metrics)) >= 2, name
    for table in ("table1/table1_paper.md", "table3/table3_paper.md"):
        assert (quick / "results" / table).read_text().startswith("> **Rehearsal**"), table
