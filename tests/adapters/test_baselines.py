"""The baselines at matched budgets, LoRA+ / AsyLoRA specifics, and ReLoRA / ReMoRA restarts."""

import pytest
import torch
from peft.tuners.lora import LoraLayer

from mora.adapters.build import METHODS, build_adapter
from mora.adapters.peft_tuner import MoraLayer
from mora.adapters.restart import REGROUP_CYCLES, next_grouping
from mora.training.restarts import Restarts, jagged_factor, restarts_of, schedule_factor
from tests.conftest import LLAMA_TARGETS

TOKENS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))


def _cfg(method, **extra):
    cfg = {"method": method, "r": 2, "alpha": 4, "dropout": 0.0, "target_modules": LLAMA_TARGETS}
    if method in ("mora", "remora"):
        cfg.update(compression="sharing")
    if method == "peft":  # any method PEFT ships, by its config class: HiRA here
        cfg = {"method": "peft", "r": 2, "config_class": "HiraConfig", "args": {"r": 2}}
        cfg["target_modules"] = LLAMA_TARGETS
    if method in ("relora", "remora"):
        cfg["restart"] = {"every": 3, "warmup": 2, "optimizer_reset": "full"}
    cfg.update(extra)
    return cfg


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_and_trains_one_step(tiny_llama, method):
    adapted = build_adapter(tiny_llama(), _cfg(method), seed=0)
    optimizer = adapted.optimizer(lr=1e-2)
    before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if p.requires_grad}
    adapted.model.train()
    adapted.model(TOKENS, labels=TOKENS).loss.backward()
    optimizer.step()
    changed = [n for n, p in adapted.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed
    assert (restarts_of(_cfg(method)) is not None) == (method in ("relora", "remora"))
    # DeepSpeed drops an empty parameter group, after which the LR scheduler (built over the groups) fails at its
    # first step: LoRA+ under ZeRO-2 did, in the rehearsal of Table 1's paper profile
    assert all(group["params"] for group in optimizer.param_groups)


def test_matched_budgets(tiny_llama):
    lora = build_adapter(tiny_llama(), _cfg("lora")).trainable_parameters()
    mora_params = build_adapter(tiny_llama(), _cfg("mora")).trainable_parameters()
    fft = build_adapter(tiny_llama(), _cfg("fft")).trainable_parameters()
    assert abs(mora_params - lora) / lora < 0.1
    assert fft == sum(p.numel() for p in tiny_llama().parameters())
    dora = build_adapter(tiny_llama(), _cfg("dora")).trainable_parameters()
    assert dora > lora  # plus the magnitude vectors


def test_loraplus_puts_a_larger_lr_on_B(tiny_llama):
    adapted = build_adapter(tiny_llama(), _cfg("loraplus", loraplus_ratio=4))
    optimizer = adapted.optimizer(lr=1e-3)
    lrs = sorted({g["lr"] for g in optimizer.param_groups if g["params"]})
    assert pytest.approx(max(lrs)) == 4e-3 and pytest.approx(1e-3) in lrs


def test_asylora_rows_are_orthonormal_and_B_is_zero(tiny_llama):
    adapted = build_adapter(tiny_llama(), _cfg("asylora"), seed=0)
    layer = next(m for m in adapted.model.modules() if isinstance(m, LoraLayer))
    A = layer.lora_A["default"].weight
    assert torch.allclose(A @ A.T, torch.eye(A.shape[0]), atol=1e-5)
    assert torch.count_nonzero(layer.lora_B["default"].weight) == 0
    assert A.requires_grad


@pytest.mark.parametrize(
    "cfg,match",
    [
        ({"method": "qlora"}, "unknown adapter method 'qlora'"),
        (_cfg("mora", r=0), "adapter.r must be a positive integer"),
        (_cfg("lora", alpha=None), "adapter.alpha must be positive"),
        (_cfg("lora", target_modules=["qkv"]), r"target_modules \['qkv'\] are not modules"),
        (_cfg("lora", target_modules=[]), "target_modules is empty"),
        (_cfg("remora", compression="rope"), "compression='rope' has no regrouping"),
        (_cfg("remora", regroup="random"), "unknown ReMoRA regroup schedule"),
        (_cfg("loraplus", loraplus_ratio=-1), "loraplus_ratio must be positive"),
        (_cfg("dora", rank_pattern={"qkv": 1}), "rank_pattern names 'qkv', which is not in adapter.target_modules"),
        (_cfg("dora", rank_pattern={"up_proj": 0}), "rank_pattern.up_proj must be a positive integer rank"),
        (_cfg("peft", config_class="HyraConfig"), "config_class 'HyraConfig' is not a PEFT config class .* HiraConfig"),
        (_cfg("peft", config_class="PromptTuningConfig"), "config_class 'PromptTuningConfig' is not a PEFT config"),
        (
            _cfg("peft", args={"rank": 2}),
            "adapter.args.rank is not an argument of HiraConfig; give one of exclude_modules, fan_in_fan_out, hira_",
        ),
        (
            _cfg("peft", args={"target_modules": ["q_proj"]}),
            "adapter.args.target_modules is the adapter.s own key: give adapter.target_modules",
        ),
        (_cfg("peft", dropout=0.1), "adapter.dropout 0.1 is not read by method peft; .* hira_dropout"),
        (_cfg("peft", config_class="C3AConfig", args={"block_size": 1024}), r"do not fit LlamaForCausalLM \(C3AConfig"),
        (_cfg("peft", config_class="LoraConfig", args={"r": 2, "layers_pattern": "layers"}), "LoraConfig refuses them"),
    ],
)
def test_bad_adapter_configs(tiny_llama, cfg, match):
    with pytest.raises(ValueError, match=match):
        build_adapter(tiny_llama(), cfg)


@pytest.mark.parametrize(
    "cfg,match",
    [
        (_cfg("relora", restart={"every": 0}), "restart interval must be a positive"),
        (_cfg("relora", restart={"every": 5, "optimizer_reset": "some"}), "unknown optimizer_reset"),
    ],
)
def test_bad_restart_configs(cfg, match):
    with pytest.raises(ValueError, match=match):
        restarts_of(cfg)


def _train_steps(adapted, optimizer, steps):
    adapted.model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        adapted.model(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()
    adapted.model.eval()


@pytest.mark.parametrize("method,regroup", [("relora", None), ("remora", "paper"), ("remora", "code")])
def test_restart_keeps_outputs_and_resets(tiny_llama, method, regroup):
    extra = {"regroup": regroup} if regroup else {}
    cfg = _cfg(method, **extra)
    adapted, restarts = build_adapter(tiny_llama(), cfg, seed=0), restarts_of(cfg)
    optimizer = adapted.optimizer(lr=1e-2)
    _train_steps(adapted, optimizer, 3)
    with torch.no_grad():
        before = adapted.model(TOKENS).logits
    base_before = {n: p.detach().clone() for n, p in adapted.model.named_parameters() if "base_layer" in n}
    assert len(optimizer.state) > 0
    layers = restarts.restart(adapted.model, optimizer)
    assert layers == 14
    with torch.no_grad():
        after = adapted.model(TOKENS).logits
    assert torch.allclose(after, before, atol=1e-5)
    changed = [
        n for n, p in adapted.model.named_parameters() if n in base_before and not torch.equal(p, base_before[n])
    ]
    assert changed  # dW moved into the frozen weights
    assert len(optimizer.state) == 0
    if method == "remora":
        layer = next(m for m in adapted.model.modules() if isinstance(m, MoraLayer))
        assert layer.mora_compression["default"] == REGROUP_CYCLES[regroup][1]
        assert torch.count_nonzero(layer.mora_M["default"]) == 0
        assert not layer.merged
        # training continues in the new grouping and the next restart is output-preserving too
        _train_steps(adapted, optimizer, 2)
        with torch.no_grad():
            again = adapted.model(TOKENS).logits
        restarts.restart(adapted.model, optimizer)
        with torch.no_grad():
            assert torch.allclose(adapted.model(TOKENS).logits, again, atol=1e-5)
        assert layer.mora_compression["default"] == REGROUP_CYCLES[regroup][2 % len(REGROUP_CYCLES[regroup])]


def test_adapter_only_optimizer_reset_keeps_other_state(tiny_llama):
    cfg = _cfg("remora", modules_to_save=["lm_head"], restart={"every": 3, "optimizer_reset": "adapter"})
    adapted = build_adapter(tiny_llama(), cfg)
    optimizer = adapted.optimizer(lr=1e-2)
    _train_steps(adapted, optimizer, 2)
    head = [p for n, p in adapted.model.named_parameters() if "lm_head" in n and p.requires_grad]
    M = [p for n, p in adapted.model.named_parameters() if "mora_M" in n]
    restarts_of(cfg).restart(adapted.model, optimizer)
    assert all(p in optimizer.state for p in head) and not any(p in optimizer.state for p in M)


def test_regroup_cycles():
    assert [next_grouping(c, "paper") for c in REGROUP_CYCLES["paper"]] == ["sharing_chunked", "sharing"]
    assert next_grouping("sharing_chunked_out", "code") == "sharing"
    assert next_grouping("sharing", "code") == "sharing_chunked"


def test_schedules_and_the_jagged_restart_schedule():
    assert schedule_factor("cosine", 0, 10, 100) == 0.0
    assert schedule_factor("cosine", 10, 10, 100) == 1.0
    assert schedule_factor("linear", 55, 10, 100) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        schedule_factor("poly", 1, 1, 2)
    total, every, warm = 100, 30, 5
    plain = [schedule_factor("cosine", s, 10, total) for s in range(total)]
    jagged = [jagged_factor("cosine", s, 10, total, every, warm) for s in range(total)]
    assert jagged[:30] == plain[:30]
    for g in (30, 60, 90):
        assert jagged[g] == 0.0  # re-warm from zero ...
        assert jagged[g + 1] == pytest.approx(jagged[g + warm] / warm)
    # ... back to the LR the schedule had at the restart, then decay over the remaining steps
    lr_at_30 = plain[30]
    assert jagged[35] == pytest.approx(lr_at_30)
    assert all(b <= a + 1e-12 for a, b in zip(jagged[35:59], jagged[36:60], strict=True))
    assert jagged[65] == pytest.approx(lr_at_30 * schedule_factor("cosine", 30, warm, total - 30))


def test_restart_due():
    restarts = Restarts(every=10)
    assert [s for s in range(0, 31) if restarts.due(s, total=30)] == [10, 20]


def _restart_in_process(rank: int, init_file: str, results: str) -> None:
    from tests.conftest import small_llama

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        adapted = build_adapter(small_llama(0), _cfg("relora"), seed=0)  # the same weights in both processes
        torch.manual_seed(100 + rank)  # the RNG where each process's dropout left it: unequal
        restarts_of(_cfg("relora")).restart(adapted.model, adapted.optimizer(lr=1e-2))
        lora_a = torch.cat([p.detach().flatten() for n, p in adapted.model.named_parameters() if "lora_A" in n])
        gathered = [torch.empty_like(lora_a) for _ in range(2)]
        torch.distributed.all_gather(gathered, lora_a)
        if rank == 0:
            torch.save(gathered, results)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_a_restart_gives_every_process_the_same_new_adapter(tmp_path):
    # ReLoRA under DDP: a restart re-draws LoRA's A from each process's RNG, which dropout on batches of unequal
    # lengths left in different states; DDP would never reconcile them
    results = tmp_path / "gathered.pt"
    torch.multiprocessing.spawn(_restart_in_process, args=(str(tmp_path / "init"), str(results)), nprocs=2)
    first, second = torch.load(results)
    assert first.abs().sum() > 0 and torch.equal(first, second)
