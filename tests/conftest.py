import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
if "MORA_DATA_CACHE" not in os.environ:  # the session's tokenised-data cache, removed when it ends
    os.environ["MORA_DATA_CACHE"] = tempfile.mkdtemp(prefix="mora-data-")
    atexit.register(shutil.rmtree, os.environ["MORA_DATA_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def small_llama(seed: int = 0, **config) -> LlamaForCausalLM:
    """A random-init LLaMA from a seed: 2 layers, 24 wide, GQA k/v (24 -> 12), MLP 24 -> 40 -> 24, vocab 50, unless
    `config` says otherwise (LlamaConfig fields)."""
    torch.manual_seed(seed)
    defaults = dict(
        vocab_size=50,
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(LlamaConfig(**{**defaults, **config}))


@pytest.fixture
def tiny_llama():
    """A 2-layer LLaMA whose shapes hit the edge cases: 24 -> 24, 24 -> 12 (GQA k/v), 24 -> 40, 40 -> 24."""

    def make(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
        return small_llama(seed).to(dtype).eval()

    return make


# A test's timeout is only there to turn a hang into a failure: far above anything a slow or loaded machine needs
# (the slowest process a test waits for takes under 2 minutes on 2 free cores), and inside CI's 90 minutes.
HANG_S = 1800
