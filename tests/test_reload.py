"""mora.training.reload: a run folder's saved adapter read back alone is the model the run evaluated."""

import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model

from mora.training.reload import reloaded
from tests.conftest import LLAMA_TARGETS, small_llama


def _in_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """Every parameter in bf16 and the buffers as they were, as DeepSpeed's bf16 engine casts a model."""
    for parameter in model.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    return model


def test_a_bf16_adapter_reloads_in_bf16_as_deepspeed_trained_it(tmp_path):
    # DeepSpeed's bf16 engine holds (and saves) a LoRA adapter in bf16; PEFT's default load computes it in float32
    base = _in_bf16(small_llama(0))  # as a bf16 model loads: its RoPE frequencies stay float32
    base.save_pretrained(tmp_path / "base")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    model = _in_bf16(get_peft_model(base, config)).eval()  # PEFT made the adapter float32; DeepSpeed casts it
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "run" / "adapter")
    spec = {"model": {"name": "small", "pretrained": str(tmp_path / "base"), "dtype": "bfloat16"}, "seed": 0}
    OmegaConf.save(OmegaConf.create(spec), tmp_path / "run" / "config.yaml")
    with torch.no_grad():
        got = reloaded(tmp_path / "run").eval()(input_ids=ids).logits
    assert torch.equal(got, expected)
