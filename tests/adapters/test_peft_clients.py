"""MoRA through PEFT's own loading paths and generic features, as a user of the library meets it: low_cpu_mem_usage in
every entry point for every operator, trainable tokens, task_type, what adapter_config.json and the model card hold,
adapters saved by the earlier version, and `mora.load` in a fresh process."""

import json
import subprocess
import sys

import pytest
import torch
from peft import (
    PeftModel,
    PeftModelForCausalLM,
    get_peft_model,
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_peft_model_state_dict,
)
from transformers import LlamaForCausalLM

import mora
from mora.adapters.mora import COMPRESSIONS
from mora.adapters.peft_tuner.config import LORA_ONLY_OPTIONS
from tests.conftest import HANG_S, small_llama

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 8, 4]])


def _base(seed=0):
    return small_llama(
        seed, num_hidden_layers=1, num_key_value_heads=4, max_position_embeddings=32, tie_word_embeddings=False
    ).eval()


def _saved(tmp_path, compression, name="adapter", seed=1, **kwargs):
    """A trained-looking (random M) adapter saved to tmp_path/name, and its logits on IDS."""
    config = mora.MoraConfig(r=2, compression=compression, target_modules=TARGETS, init_weights=False, **kwargs)
    torch.manual_seed(seed)
    model = get_peft_model(_base(), config)
    model.save_pretrained(tmp_path / name)
    return model(input_ids=IDS).logits.detach()


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_from_pretrained_with_low_cpu_mem_usage(tmp_path, compression):
    expected = _saved(tmp_path, compression)
    model = PeftModel.from_pretrained(_base(), tmp_path / "adapter", low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-6)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_load_adapter_with_low_cpu_mem_usage(tmp_path, compression):
    first = _saved(tmp_path, "sharing", "first", seed=1)
    second = _saved(tmp_path, compression, "second", seed=2)
    model = PeftModel.from_pretrained(_base(), tmp_path / "first")
    model.load_adapter(tmp_path / "second", adapter_name="second", low_cpu_mem_usage=True)
    assert torch.allclose(model(input_ids=IDS).logits, first, atol=1e-6)
    model.set_adapter("second")
    assert torch.allclose(model(input_ids=IDS).logits, second, atol=1e-6)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_inject_adapter_in_model_with_low_cpu_mem_usage_then_load_the_state(tmp_path, compression):
    config = mora.MoraConfig(r=2, compression=compression, target_modules=TARGETS, init_weights=False)
    torch.manual_seed(1)
    reference = inject_adapter_in_model(config, _base())
    expected = reference(input_ids=IDS).logits.detach()
    model = inject_adapter_in_model(config, _base(), low_cpu_mem_usage=True)
    assert any(p.is_meta for p in model.parameters())  # M is not materialised before its weights are loaded
    set_peft_model_state_dict(model, get_peft_model_state_dict(reference), low_cpu_mem_usage=True)
    assert not any(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-6)


def test_trainable_token_indices_train_only_those_embedding_rows(tmp_path):
    config = mora.MoraConfig(r=2, target_modules=TARGETS, trainable_token_indices=[3, 7], task_type="CAUSAL_LM")
    model = get_peft_model(_base(), config)
    embedding = model.get_input_embeddings()
    assert "TrainableTokens" in type(embedding).__name__
    before = model.get_input_embeddings()(torch.arange(50)).detach()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    optimizer.step()
    after = model.get_input_embeddings()(torch.arange(50)).detach()
    changed = sorted((before - after).abs().sum(-1).nonzero().flatten().tolist())
    assert changed == [3, 7]
    model.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["trainable_token_indices"] == [3, 7]
    reloaded = PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    assert torch.allclose(reloaded.get_input_embeddings()(torch.arange(50)), after, atol=1e-6)


@pytest.mark.parametrize("unload", ["merge_and_unload", "unload"])
def test_trainable_tokens_unload_with_the_adapter(unload):
    # found by PEFT's generic tuner tests with MoRA rows: BaseTuner's module swap failed on the tokens wrapper
    config = mora.MoraConfig(r=2, target_modules=TARGETS, trainable_token_indices=[3, 7], init_weights=False)
    model = get_peft_model(_base(), config)
    with torch.no_grad():
        model.get_input_embeddings().token_adapter.trainable_tokens_delta["default"].add_(1.0)
    expected = model(input_ids=IDS).logits.detach()
    plain = getattr(model, unload)()
    assert type(plain.get_input_embeddings()) is torch.nn.Embedding
    assert not any(isinstance(m, mora.MoraLayer) for m in plain.modules())
    if unload == "merge_and_unload":  # the trained rows and M are in the plain model's weights
        assert torch.allclose(plain(input_ids=IDS).logits, expected, atol=1e-5)


def test_task_type_gives_the_causal_lm_class():
    model = get_peft_model(_base(), mora.MoraConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"))
    assert isinstance(model, PeftModelForCausalLM)


def test_adapter_config_holds_no_lora_only_nulls_and_older_adapters_still_load(tmp_path):
    expected = _saved(tmp_path, "rope")
    path = tmp_path / "adapter" / "adapter_config.json"
    saved = json.loads(path.read_text())
    assert not set(LORA_ONLY_OPTIONS) & set(saved)
    assert {"r", "compression", "rounding", "r_hat_rule", "target_modules", "task_type"} <= set(saved)
    legacy = {**saved, **dict.fromkeys(LORA_ONLY_OPTIONS)}  # as version 0.1.0 wrote them: every one null
    path.write_text(json.dumps(legacy))
    model = PeftModel.from_pretrained(_base(), tmp_path / "adapter")
    assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-6)


def test_the_model_card_says_what_the_adapter_is_and_how_to_load_it(tmp_path):
    _base().save_pretrained(tmp_path / "base")

    def config():
        return mora.MoraConfig(r=4, compression="sharing", target_modules=TARGETS, task_type="CAUSAL_LM")

    get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), config()).save_pretrained(tmp_path / "named")
    card = (tmp_path / "named" / "README.md").read_text()
    for text in (
        "# MoRA adapter",
        "arxiv.org/abs/2405.12130",
        "operator sharing (Eq. 6), r = 4",
        "r_hat = int(sqrt((d_in + d_out) * r) + 0.5)",
        f"base_model: {tmp_path / 'base'}",
        "pip install mora-lab",
        "import mora",
        "KeyError: 'MORA'",
        "- mora",
        "- PEFT ",
    ):
        assert text in card, text
    get_peft_model(_base(), config()).save_pretrained(tmp_path / "unnamed")  # a model built from a config
    card = (tmp_path / "unnamed" / "README.md").read_text()
    assert "base_model" not in card.split("---")[1] and "not recorded" in card


def test_mora_load_in_a_fresh_process_gives_the_saved_model_merged_or_not(tmp_path):
    _base().save_pretrained(tmp_path / "base")
    config = mora.MoraConfig(r=2, compression="rope", target_modules=TARGETS, task_type="CAUSAL_LM", init_weights=False)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base"), config)
    model.save_pretrained(tmp_path / "adapter")
    expected = model(input_ids=IDS).logits.detach()
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch, mora
model = mora.load({str(tmp_path / "adapter")!r}, low_cpu_mem_usage=True)
ids, expected = torch.tensor({IDS.tolist()}), torch.load({str(tmp_path / "expected.pt")!r})
assert type(model).__name__ == "PeftModelForCausalLM", type(model)
assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)
merged = model.merge_and_unload()
assert type(merged).__name__ == "LlamaForCausalLM"
assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_S)
    assert result.stdout.strip().endswith("ok"), result.stderr[-2000:]
