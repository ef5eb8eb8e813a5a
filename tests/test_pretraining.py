"""Pretraining from scratch (Table 3): the c4 recipe's packing on a fixture in C4's schema, perplexity, the ΔW
spectrum, restarts in the pretraining setup (trainable embeddings, head and norms), the paper's figures on the meta
device, and a reduced tiny Table 3 end to end through the runner and reporter."""

import csv
import json
import math
import os
import socket

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers.modeling_outputs import CausalLMOutput

from experiments.reproduce import main, runs
from mora.adapters.build import PAPER_METHODS, build_adapter
from mora.evaluation.perplexity import perplexity
from mora.evaluation.spectrum import adapted_layers, delta_weights, initial_weights, spectrum
from mora.models import MissingAssetError, build_model
from mora.paths import CONFIG_DIR, REPO_ROOT
from mora.tasks import c4
from mora.tasks.corpus import python_docs, python_docs_split
from mora.tasks.tokenizer import fixture_bpe
from mora.training.reload import evaluate_saved
from mora.training.restarts import restarts_of
from mora.training.run import run as train_run
from mora.training.run import validate
from scripts.smoke import check_run_folder, smoke_overrides
from tests.conftest import LLAMA_TARGETS, small_llama

FIXTURE = "tests/fixtures/c4.jsonl"
EMBHEAD = ["embed_tokens", "lm_head", "norm", "input_layernorm", "post_attention_layernorm"]


def _compose(overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def _fixture_cfg(block_size=512, tokens=None):
    source = {"path": "json", "name": None, "split": "train", "data_files": {"train": FIXTURE}}
    return {
        "name": "c4",
        "recipe": "c4",
        "source": source,
        "eval_source": source,
        "text_column": "text",
        "block_size": block_size,
        "train_tokens": tokens,
        "tokenizer": None,
        "vocab_size": 2048,
        "eval": {"tokens": block_size, "batch_size": 4},
    }


# --- packing ---------------------------------------------------------------------------------------------------


def test_pack_stream_cuts_full_blocks_across_documents_and_drops_only_the_tail():
    documents = [[1, 2, 3], [], [4, 5, 6, 7, 8, 9, 10, 11], [12]]
    assert list(c4.pack_stream(documents, 4)) == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert list(c4.pack_stream([[1, 2, 3]], 4)) == []
    with pytest.raises(ValueError, match="block_size must be at least 2"):
        list(c4.pack_stream(documents, 1))


def test_c4_fixture_packs_into_exact_512_token_blocks_with_no_token_lost_or_repeated():
    rows = [json.loads(line) for line in (REPO_ROOT / FIXTURE).read_text().splitlines()]
    assert all(set(r) == {"text", "timestamp", "url"} for r in rows)  # C4's schema
    tokenizer = fixture_bpe()
    task = c4.build(_fixture_cfg(), tokenizer)
    stream = [t for r in rows for t in tokenizer(r["text"] + tokenizer.eos_token).input_ids]  # independent of pack
    blocks = [list(b) for b in task.train["input_ids"]]
    assert len(blocks) == len(stream) // 512 >= 3
    assert all(len(b) == 512 for b in blocks)
    assert [t for b in blocks for t in b] == stream[: 512 * len(blocks)]
    assert stream[0] == tokenizer.bos_token_id and stream.count(tokenizer.eos_token_id) == len(rows)
    assert task.valid.shape == (1, 512)  # eval.tokens = one block
    batch = task.collate(next(task.batches(0, 2, seed=0)))
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()  # every token a label


def test_train_tokens_caps_the_stream_and_the_cache_key_follows_the_settings():
    tokenizer = fixture_bpe()
    whole = c4.build(_fixture_cfg(block_size=64), tokenizer)
    capped = c4.build(_fixture_cfg(block_size=64, tokens=64 * 5 + 10), tokenizer)
    assert len(capped) == 5 and len(whole) > 5
    assert capped.train["input_ids"] == whole.train["input_ids"][:5]
    assert capped.data_hash != whole.data_hash


def test_python_docs_corpus_is_real_text_with_a_fixed_held_out_tenth():
    docs = python_docs()
    train, valid = python_docs_split("train"), python_docs_split("validation")
    assert len(train) + len(valid) == len(docs) and len(valid) == math.ceil(len(docs) / 10)
    assert {d["url"] for d in train}.isdisjoint(d["url"] for d in valid)
    assert sum(len(d["text"]) for d in docs) > 1_000_000 and "the" in docs[0]["text"].split()
    with pytest.raises(ValueError, match="splits train, validation"):
        python_docs_split("test")


def test_the_paper_tokenizer_missing_offline_is_one_line_naming_prefetch():
    with pytest.raises(MissingAssetError, match=r"tokenizer 't5-base'.*make prefetch PROFILE=paper.*task.tokenizer"):
        c4.tokenizer({"tokenizer": "t5-base"})


def test_a_streamed_hub_source_missing_offline_is_one_line_naming_prefetch():
    cfg = _compose(["task=c4", "profile=paper", "model=llama_250m"]).task
    with pytest.raises(MissingAssetError, match=r"dataset 'allenai/c4'.*make prefetch PROFILE=paper"):
        c4.build(cfg, fixture_bpe())


def test_a_multi_process_run_refuses_to_build_the_hub_cache_itself(monkeypatch):
    cfg = _compose(["task=c4", "profile=paper", "model=llama_250m"]).task
    monkeypatch.setenv("WORLD_SIZE", "8")  # before any hub access: the other ranks would time out in the barrier
    with pytest.raises(MissingAssetError, match=r"not in the data cache.*make prefetch PROFILE=paper TASKS=c4"):
        c4.build(cfg, fixture_bpe())


def test_pretraining_needs_a_model_built_from_config():
    cfg = _compose(["task=c4", "profile=paper"])  # the paper profile's model is the pretrained LLaMA-2-7B
    with pytest.raises(ValueError, match=r"task c4 pretrains from scratch.*model=llama_250m"):
        validate(cfg, world=8)


# --- perplexity ------------------------------------------------------------------------------------------------


class FixedLM(torch.nn.Module):
    """Logits that put probability p on token (id + 1) % vocab after each token, the rest spread evenly."""

    def __init__(self, vocab: int, p: float) -> None:
        super().__init__()
        self.vocab, self.p = vocab, p
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids):
        probs = torch.full((*input_ids.shape, self.vocab), (1 - self.p) / (self.vocab - 1))
        probs.scatter_(-1, ((input_ids + 1) % self.vocab).unsqueeze(-1), self.p)
        return CausalLMOutput(logits=probs.log())


def test_perplexity_is_exp_of_the_mean_token_loss_on_hand_checkable_cases():
    counting = torch.arange(12).remainder(8).reshape(3, 4)  # each next token is (previous + 1) % 8
    assert perplexity(FixedLM(8, 0.5), counting, batch_size=2) == pytest.approx(
        {"loss": math.log(2), "ppl": 2.0, "tokens": 9}
    )
    uniform = perplexity(FixedLM(8, 1 / 8), counting, batch_size=2)
    assert uniform["ppl"] == pytest.approx(8.0)
    # half the predictions right with p = 0.9, half wrong with (1 - 0.9) / 7: the mean of the two losses
    mixed = torch.tensor([[0, 1, 3], [5, 6, 0]])
    expected = (2 * -math.log(0.9) + 2 * -math.log(0.1 / 7)) / 4
    assert perplexity(FixedLM(8, 0.9), mixed, batch_size=1)["ppl"] == pytest.approx(math.exp(expected))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _perplexity_worker(rank, world, port, blocks, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    result = perplexity(FixedLM(8, 0.7), blocks, batch_size=2)
    if rank == 0:
        torch.save(result, out)
    torch.distributed.destroy_process_group()


@pytest.mark.multiprocess
def test_perplexity_over_two_processes_equals_one_process(tmp_path):
    blocks = torch.randint(0, 8, (5, 6), generator=torch.Generator().manual_seed(0))  # 3 + 2 blocks: rank 1 pads
    out = tmp_path / "result.pt"
    torch.multiprocessing.spawn(_perplexity_worker, args=(2, _free_port(), blocks, out), nprocs=2)
    assert torch.load(out) == pytest.approx(perplexity(FixedLM(8, 0.7), blocks, batch_size=2))


# --- spectrum and restarts -------------------------------------------------------------------------------------


def _llama(seed=0):
    return small_llama(
        seed, vocab_size=64, hidden_size=32, intermediate_size=48, num_key_value_heads=4, max_position_embeddings=32
    )


def _pretrain_model(method, **extra):
    """A random-init LLaMA with the method on all seven projections and embeddings, norms and head trainable,
    and the same LLaMA as built at step 0 (a second build from the same seed)."""
    cfg = {"method": method, "r": 4, "alpha": 8, "target_modules": LLAMA_TARGETS, "modules_to_save": EMBHEAD}
    cfg.update({"compression": "sharing"} if method in ("mora", "remora") else {})
    cfg.update(extra)
    return build_adapter(_llama(), cfg, seed=0), restarts_of(cfg), _llama()


def test_the_spectrum_of_a_known_low_rank_update_gives_its_rank():
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 3, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(24, 3, generator=generator))
    rank3 = u @ torch.diag(torch.tensor([5.0, 1.0, 0.2])) @ v.T  # singular values 5, 1, 0.2; the rest 0
    rank1 = 0.05 * u[:, :1] @ v[:, :1].T  # below the threshold
    result = spectrum(
        {"layers.0.mlp.up_proj": rank3, "layers.1.mlp.up_proj": rank1, "layers.0.self_attn.q_proj": rank1}
    )
    up = result["up_proj"]
    assert up["above"] == [3, 0] and up["mean_above"] == 1.5 and result["q_proj"]["above"] == [0]
    assert up["singular_values"][0][:3] == pytest.approx([5.0, 1.0, 0.2], rel=1e-4)
    assert len(up["singular_values"][0]) == 24


@pytest.mark.parametrize("method", ["lora", "mora"])
def test_the_update_of_an_adapter_that_never_merges_is_its_delta_weight(method):
    adapted, _, step0 = _pretrain_model(method)
    initial = initial_weights(step0, list(adapted_layers(adapted.model)))
    assert set(initial) == {
        f"model.layers.{i}.{p}.{t}"
        for i in (0, 1)
        for p, ts in (
            ("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
            ("mlp", ("gate_proj", "up_proj", "down_proj")),
        )
        for t in ts
    }
    for p in adapted.model.parameters():
        if p.requires_grad and p.dim() == 2:
            torch.nn.init.normal_(p, std=0.1)
    deltas = delta_weights(adapted.model, initial)
    for name, layer in adapted_layers(adapted.model).items():
        assert torch.allclose(deltas[name], layer.get_delta_weight("default").float(), atol=1e-6)
    counts = {k: v["above"] for k, v in spectrum(deltas).items()}
    if method == "lora":  # a rank-4 LoRA has at most 4 non-zero singular values
        assert all(c <= 4 for cs in counts.values() for c in cs)
    else:  # MoRA's square M lets the update reach a higher rank
        assert max(c for cs in counts.values() for c in cs) > 4


def _train_steps(adapted, steps, seed=0):
    optimizer = adapted.optimizer(lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=generator)
        adapted.model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize(("method", "regroup"), [("relora", None), ("remora", "paper"), ("remora", "code")])
def test_a_restart_in_the_pretraining_setup_keeps_outputs_and_the_embedding_optimizer_state(method, regroup):
    extra = {"restart": {"every": 3, "warmup": 1, "optimizer_reset": "adapter"}}
    if regroup:
        extra["regroup"] = regroup
    adapted, restarts, _ = _pretrain_model(method, **extra)
    optimizer = _train_steps(adapted, 3)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(9))
    adapted.model.eval()
    before = adapted.model(input_ids=ids).logits
    embed = next(p for n, p in adapted.model.named_parameters() if "embed_tokens" in n and p.requires_grad)
    adapter = [p for n, p in adapted.model.named_parameters() if ("lora_" in n or "mora_" in n) and p.requires_grad]
    assert embed in optimizer.state and all(p in optimizer.state for p in adapter)
    assert restarts.restart(adapted.model, optimizer) == 14
    assert torch.allclose(adapted.model(input_ids=ids).logits, before, atol=1e-5)
    assert embed in optimizer.state and not any(p in optimizer.state for p in adapter)  # the authors' pretrain mode


def test_remora_accumulated_update_is_the_base_weight_difference_plus_the_current_m():
    adapted, restarts, step0 = _pretrain_model(
        "remora", restart={"every": 2, "warmup": 0, "optimizer_reset": "adapter"}
    )
    initial = initial_weights(step0, list(adapted_layers(adapted.model)))
    optimizer = _train_steps(adapted, 2)
    restarts.restart(adapted.model, optimizer)  # merged into the base, M zeroed
    layers = adapted_layers(adapted.model)
    deltas = delta_weights(adapted.model, initial)
    for name, layer in layers.items():
        moved = layer.get_base_layer().weight.detach() - initial[name]
        assert moved.abs().max() > 0 and torch.allclose(deltas[name], moved, atol=1e-6)
    _train_steps(adapted, 1, seed=1)  # M trains again after the merge: counted on top of the moved base
    deltas = delta_weights(adapted.model, initial)
    for name, layer in layers.items():
        moved = layer.get_base_layer().weight.detach() - initial[name]
        assert torch.allclose(deltas[name], moved + layer.get_delta_weight("default"), atol=1e-6)


# --- the paper's figures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "lora", "mora"), [("llama_250m", 49.55, 49.54), ("llama_1b", 119.53, 119.47)])
def test_paper_trainable_adapter_parameters_at_r128_on_the_meta_device(model, lora, mora):
    counts = {}
    for method in ("lora", "mora"):
        settings = {"lora": "adapter.alpha=64", "mora": "adapter.compression=sharing"}[method]
        overrides = ["task=c4", "profile=paper", "experiment=table3", f"model={model}", f"adapter={method}"]
        cfg = _compose([*overrides, "adapter.r=128", settings])
        adapted = build_adapter(build_model(cfg.model, meta=True), cfg.adapter)
        names = [n for n, p in adapted.model.named_parameters() if p.requires_grad]
        counts[method] = sum(
            p.numel() for n, p in adapted.model.named_parameters() if p.requires_grad and ("lora_" in n or "mora_" in n)
        )
        assert any("embed_tokens" in n for n in names) and any("lm_head" in n for n in names)  # --train_embhead
        assert any("input_layernorm" in n for n in names) and any("model.norm" in n for n in names)
    assert round(counts["lora"] / 1e6, 2) == lora and round(counts["mora"] / 1e6, 2) == mora


TABLE_TASKS = {
    ("table3", "paper"): "c4",
    ("table3", "tiny"): "c4",
    ("table4", "paper"): "metamath",
    ("table4", "tiny"): "uuid",
}


@pytest.mark.parametrize(("table", "profile"), list(TABLE_TASKS))
def test_every_table3_and_table4_run_composes_under_both_profiles(tmp_path, table, profile):
    todo, base = runs(table, profile, [0], [TABLE_TASKS[table, profile]], tmp_path)
    assert len(todo) == {"table3": 8, "table4": 16}[table]  # 4 methods x (2 models | 2 LRs); 8 cells x 2 LRs
    assert (base is not None) == (table == "table4" and profile == "tiny")  # Table 2's base model
    for job in todo:
        cfg = _compose([o for o in job.overrides if not o.startswith("run.dir=")])
        validate(cfg, world=8 if profile == "paper" else 1)
        if table == "table4":
            assert cfg.adapter.method == "mora" and cfg.adapter.compression == job.cell.rsplit("-", 1)[0]
            if profile == "paper":  # the table is GSM8K alone: no MATH generations
                assert list(cfg.task.eval.columns) == ["gsm8k"]
            continue
        assert list(cfg.adapter.modules_to_save) == EMBHEAD and cfg.train.spectrum
        restart = cfg.adapter.get("restart")
        if profile == "paper":
            t = cfg.train
            assert (t.steps, t.global_batch, t.warmup, t.schedule, t.lr) == (10000, 1024, 1000, "cosine", 5e-4)
            assert cfg.model.name in ("llama_250m", "llama_1b") and cfg.model.config.vocab_size == 32100
            assert (cfg.adapter.r, cfg.task.block_size, cfg.task.tokenizer) == (128, 512, "t5-base")
            assert cfg.task.eval.tokens == 10_000_000
            if restart is not None:
                assert (restart.every, restart.warmup, restart.optimizer_reset) == (2000, 50, "adapter")
                assert job.launcher == "ddp"
        elif restart is not None:
            assert (restart.every, restart.optimizer_reset) == (60, "adapter")


# --- the tables end to end -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_reduced_tiny_table3_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    argv = ["table3", "--cells", "relora", "remora", "--seeds", "0", "--jobs", "1", "--runs", str(tmp_path / "runs")]
    argv += ["--out", str(out), "--set", "train.steps=6", "train.warmup=1", "train.eval_steps=[3,6]"]
    argv += ["adapter.restart.every=3", "task.train_tokens=4096", "task.eval.tokens=2560"]
    assert main(argv) == 0
    table = (out / "table3.md").read_text()
    assert "| ReLoRA | 32.19 | 27.80 |" in table and "| ReMoRA | 26.74 | 23.34 |" in table
    rows = list(csv.DictReader((out / "table3.csv").open()))
    ours = [r for r in rows if r["source"] == "ours"]
    assert {r["method"] for r in ours} == {"ReLoRA", "ReMoRA"} and all(float(r["ppl"]) > 1 for r in ours)
    assert (out / "fig4_loss.png").stat().st_size > 0 and (out / "fig5_spectrum.png").stat().st_size > 0
    for cell in ("relora", "remora"):
        run = next((out / "runs" / "tiny").glob(f"{cell}-lr*-s0"))
        summary = json.loads((run / "summary.json").read_text())
        assert set(summary["spectrum"]) == set(LLAMA_TARGETS)
        assert json.loads((run / "spectrum.json").read_text())["q_proj"]["threshold"] == 0.1
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [e["step"] for e in events if e.get("event") == "restart"] == [3]
        assert [e["step"] for e in events if "eval/ppl" in e] == [3, 6]


@pytest.mark.slow
def test_a_reduced_tiny_table4_runs_end_to_end(tmp_path):
    out = tmp_path / "results"
    argv = ["table4", "--cells", "truncation-r8", "rope-r8", "--seeds", "0", "--jobs", "1"]
    argv += ["--runs", str(tmp_path / "runs"), "--out", str(out), "--set", "train.steps=4", "train.eval_steps=[4]"]
    assert main(argv) == 0
    table = (out / "table4.md").read_text()
    assert "| Truncation | Eq. 4 | 59.5 | 66.6 |" in table and "| Rotation | Eq. 9 | 64.2 | 67.9 |" in table
    rows = [r for r in csv.DictReader((out / "table4.csv").open()) if r["source"] == "ours"]
    assert {(r["operator"], r["rank"], r["our_rank"], r["metric"]) for r in rows} == {
        ("truncation", "8", "2", "char_acc"),
        ("rope", "8", "2", "char_acc"),
    }
    assert (out / "runs" / "tiny" / "base" / "summary.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method", PAPER_METHODS)
def test_every_method_pretrains_on_the_c4_recipe(tmp_path, method):
    folder = tmp_path / method
    # a learning rate at which two steps move the perplexity well past the reload check's tolerance
    cfg = _compose(["task=c4", *smoke_overrides(method, "c4", 4, folder), "train.lr=1e-2"])
    summary = train_run(cfg)
    assert check_run_folder(folder) == [] and summary["examples"] == 64
    if method != "fft":  # the adapter's own count, as built (a merged ReLoRA model has none left to count)
        built = build_adapter(build_model(cfg.model, meta=True), cfg.adapter).trainable_parameters()
        assert summary["trainable_params"] == built
    assert (
        math.isfinite(summary["evaluation"]["scores"]["ppl"]) and summary["evaluation"]["scores"]["tokens"] == 8 * 127
    )
    assert (folder / "spectrum.json").exists() == (method not in ("fft", "dora"))  # DoRA: not base + delta
    # what the run left on disk is what it evaluated: reloaded alone, the same perplexity (ReLoRA / ReMoRA, whose
    # base weights hold the merged segments, save the merged model)
    saved = evaluate_saved(folder)
    assert saved["agree"], saved
    if method in ("lora", "loraplus", "asylora"):  # the step-0 base rebuilt exactly: ΔW is the rank-8 adapter's
        values = [
            v for kind in json.loads((folder / "spectrum.json").read_text()).values() for v in kind["singular_values"]
        ]
        assert all(v[0] > 1e-4 and max(v[8:]) < 1e-6 for v in values)
