"""MoRA as a stock-PEFT method: get_peft_model, save/load, merge/unmerge, disable, dtypes, and the authors' faults."""

import json
import warnings

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

import mora
from mora.adapters.mora import COMPRESSIONS, delta
from mora.adapters.peft_tuner import MoraLayer, MoraLinear, peft_type, registry
from tests.conftest import LLAMA_TARGETS, small_llama

TOKENS = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(0))
LLAMA_OPERATORS = [c for c in COMPRESSIONS if c not in ("truncation", "sharing_chunked", "sharing_chunked_in")]


def _config(compression="rope", r=2, **kwargs):
    return mora.MoraConfig(r=r, compression=compression, target_modules=LLAMA_TARGETS, **kwargs)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def _randomise(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in model.modules():
            if isinstance(layer, MoraLayer):
                for M in layer.mora_M.values():
                    M.normal_(0, 0.2)


def test_registered_with_peft():
    assert peft.PeftType.MORA.value == "MORA"
    assert "MORA" in [t.value for t in peft.PeftType]
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_CONFIG_MAPPING[peft.PeftType.MORA] is mora.MoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[peft.PeftType.MORA] is mora.MoraModel
    registry.register(mora.MoraConfig, mora.MoraModel)  # idempotent


def test_registration_refuses_a_foreign_mora_and_old_peft():
    class Other(mora.MoraModel):
        pass

    with pytest.raises(ImportError, match="already has a method named 'mora'"):
        registry.register(mora.MoraConfig, Other)
    with pytest.raises(ImportError, match="needs peft>="):
        peft_type.check_peft_version("0.10.0")
    with pytest.warns(UserWarning, match="tested with peft"):
        peft_type.check_peft_version("9.0.0")


@pytest.mark.parametrize("compression", LLAMA_OPERATORS)
def test_fresh_adapter_changes_nothing(tiny_llama, compression):
    base = _logits(tiny_llama())
    model = get_peft_model(tiny_llama(), _config(compression))
    assert torch.equal(_logits(model), base)


@pytest.mark.parametrize("compression", LLAMA_OPERATORS)
def test_merge_unmerge_and_merged_outputs(tiny_llama, compression):
    model = get_peft_model(tiny_llama(), _config(compression))
    _randomise(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = _logits(model)
    assert not torch.allclose(unmerged, _logits(tiny_llama()))
    model.merge_adapter()
    assert torch.allclose(_logits(model), unmerged, atol=1e-5)
    model.unmerge_adapter()
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.allclose(p, weights[n], atol=1e-6), n
    assert torch.allclose(_logits(model), unmerged, atol=1e-6)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, MoraLayer) for m in merged.modules())
    assert torch.allclose(_logits(merged), unmerged, atol=1e-5)


@pytest.mark.parametrize("compression", LLAMA_OPERATORS)
def test_save_load_roundtrip(tiny_llama, tmp_path, compression):
    model = get_peft_model(tiny_llama(), _config(compression))
    _randomise(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "MORA" and config["compression"] == compression and config["r"] == 2
    assert "sqrt((d_in + d_out) * r)" in config["r_hat_rule"]
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    for name, M in model.named_parameters():
        if "mora_M" in name:
            assert torch.equal(loaded.get_parameter(name), M), name  # the weights round-trip bit for bit
    # outputs to float32 rounding (CPU matmul kernels may differ with the loaded tensors' alignment)
    assert torch.allclose(_logits(loaded), expected, atol=1e-6, rtol=0)


def test_weights_file_holds_M_once(tiny_llama, tmp_path):
    model = get_peft_model(tiny_llama(), _config("rope"))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layers = [m for m in model.modules() if isinstance(m, MoraLayer)]
    assert len(tensors) == len(layers) == 14
    assert all(k.endswith("mora_M") for k in tensors)
    assert sum(t.numel() for t in tensors.values()) == model.get_nb_trainable_parameters()[0]


def test_loading_onto_a_model_of_other_shapes_fails_clearly(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), _config("sharing")).save_pretrained(tmp_path)
    other = small_llama(hidden_size=32, max_position_embeddings=2048)
    with pytest.raises(ValueError, match="MoRA adapter does not fit this model.*needs"):
        PeftModel.from_pretrained(other, tmp_path)


def test_loading_an_adapter_with_an_unknown_operator_fails_clearly(tiny_llama, tmp_path):
    get_peft_model(tiny_llama(), _config("rope")).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(path.read_text().replace('"rope"', '"rotation"'))
    with pytest.raises(ValueError, match="unknown compression 'rotation'"):
        PeftModel.from_pretrained(tiny_llama(), tmp_path)


def test_gradients_reach_M_and_nothing_frozen(tiny_llama):
    model = get_peft_model(tiny_llama(), _config("rope"))
    _randomise(model)
    model(TOKENS, labels=TOKENS).loss.backward()
    for name, p in model.named_parameters():
        if "mora_M" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_fresh_M_still_gets_gradients(tiny_llama):
    model = get_peft_model(tiny_llama(), _config("sharing"))
    model(TOKENS, labels=TOKENS).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "mora_M" in n]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_disable_adapter_and_multiple_adapters(tiny_llama):
    base = _logits(tiny_llama())
    model = get_peft_model(tiny_llama(), _config("rope"))
    _randomise(model)
    adapted = _logits(model)
    with model.disable_adapter():
        assert torch.equal(_logits(model), base)
    model.add_adapter("other", _config("sharing"))
    model.set_adapter("other")
    assert torch.equal(_logits(model), base)  # the new adapter is zero
    model.set_adapter("default")
    assert torch.equal(_logits(model), adapted)


def test_each_active_adapter_draws_its_own_dropout_mask():
    # the authors reassign x = dropout(x), so a second adapter sees x dropped twice
    layer = MoraLinear(
        nn.Linear(16, 16), "a", mora.MoraConfig(r=2, compression="sharing", dropout=0.5, init_weights=False)
    )
    layer.update_layer("b", mora.MoraConfig(r=2, compression="sharing", dropout=0.5, init_weights=False))
    layer.set_adapter(["a", "b"])
    layer.train()
    x = torch.randn(4, 16)
    torch.manual_seed(0)
    out = layer(x)
    torch.manual_seed(0)
    masked = [torch.nn.functional.dropout(x, 0.5), torch.nn.functional.dropout(x, 0.5)]
    updates = [delta(h, layer.mora_M[n], 16, "sharing") for h, n in zip(masked, ["a", "b"], strict=True)]
    expected = layer.base_layer(x) + updates[0] + updates[1]
    assert torch.allclose(out, expected, atol=1e-6)


def test_rope_tables_are_buffers_that_follow_to():
    layer = MoraLinear(nn.Linear(40, 24), "default", mora.MoraConfig(r=2, compression="rope"))
    buffers = dict(layer.named_buffers())
    assert "mora_cos.default" in buffers and "mora_sin.default" in buffers
    assert "mora_cos.default" not in layer.state_dict()  # rebuilt, never saved
    layer.to(torch.float64)
    assert layer.mora_cos["default"].dtype == torch.float64
    layer.to("meta")
    assert layer.mora_cos["default"].device.type == "meta" and layer.mora_M["default"].device.type == "meta"


@pytest.mark.parametrize("autocast", [True, False])
def test_bfloat16_base_computes_in_bfloat16(tiny_llama, autocast):
    model = get_peft_model(tiny_llama(dtype=torch.bfloat16), _config("rope"), autocast_adapter_dtype=autocast)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.mora_M["default"].dtype == (torch.float32 if autocast else torch.bfloat16)
    _randomise(model)
    x = torch.randn(3, 24, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # M is cast down, the input is never upcast; the sum is within bfloat16 rounding of the exact one (the layer
    # accumulates the adapter's GEMMs into the base output, so it rounds once where base + delta rounds twice)
    M16, weight = layer.mora_M["default"].to(torch.bfloat16), layer.base_layer.weight
    exact = x.double() @ weight.double().T + delta(x.double(), M16.double(), 24, "rope")
    assert (out.double() - exact).abs().max() <= 2**-7 * exact.abs().max()


def test_lora_only_options_warn():
    with pytest.warns(UserWarning, match="lora_alpha=16 is a LoRA option that MoRA does not use"):
        mora.MoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"])
    with pytest.warns(UserWarning, match="MoRA's is `dropout`"):
        mora.MoraConfig(r=8, lora_dropout=0.1, target_modules=["q_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mora.MoraConfig(r=8, target_modules=["q_proj"])


def test_config_errors():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        mora.MoraConfig(r=0)
    with pytest.raises(ValueError, match="mora_type=1 is compression='sharing'"):
        mora.MoraConfig(r=8, compression=1)
    with pytest.raises(ValueError, match="unknown rounding"):
        mora.MoraConfig(r=8, rounding="up")
    with pytest.raises(ValueError, match="dropout must be in"):
        mora.MoraConfig(r=8, dropout=1.5)


def test_gpt2_conv1d_merges_with_the_transpose():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=24, n_layer=2, n_head=4, n_positions=32)).eval()
    model = get_peft_model(gpt2, mora.MoraConfig(r=2, compression="rope", target_modules=["c_attn", "c_fc"]))
    _randomise(model)
    unmerged = _logits(model)
    merged = model.merge_and_unload()
    assert torch.allclose(_logits(merged), unmerged, atol=1e-5)


class FakeQuantLinear(nn.Module):
    """Stands in for a bitsandbytes / GPTQ layer: integer weights."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 24, 24
        self.weight = nn.Parameter(torch.zeros(24, 24, dtype=torch.int8), requires_grad=False)


def test_quantized_base_is_refused():
    with pytest.raises(ValueError, match="MoRA does not support quantized base layers"):
        MoraLinear(FakeQuantLinear(), "default", mora.MoraConfig(r=2))

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = FakeQuantLinear()

    with pytest.raises(ValueError, match="quantized base layers: q_proj"):
        get_peft_model(Wrapper(), mora.MoraConfig(r=2, target_modules=["q_proj"]))


def test_shape_the_operator_cannot_handle_is_refused_at_injection(tiny_llama):
    with pytest.raises(ValueError, match="truncation keeps the first r_hat features"):
        get_peft_model(tiny_llama(), _config("truncation", r=8))
