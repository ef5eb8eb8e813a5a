"""MoRA in the clients users train with: transformers.Trainer (resuming from its checkpoint) and TRL's SFTTrainer
(also with a chat template, which makes TRL set `trainable_token_indices`), then the saved adapter loaded in a
fresh process with AutoPeftModelForCausalLM from a local base folder, merged == unmerged."""

import copy
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import mora
from mora.tasks.tokenizer import fixture_bpe
from tests.conftest import HANG_S

pytestmark = pytest.mark.slow
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture
def base(tmp_path):
    """A tiny LLaMA and its tokenizer saved as a local base-model folder."""
    tokenizer = fixture_bpe()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def _config(**kwargs):
    return mora.MoraConfig(r=2, compression="rope", target_modules=TARGETS, task_type="CAUSAL_LM", **kwargs)


def _trainer(base, out, steps):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), _config())
    ids = torch.randint(0, 2048, (16, 24), generator=torch.Generator().manual_seed(0)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, train_dataset=data)


def _check_in_fresh_process(adapter, base, tmp_path, expected):
    """AutoPeftModelForCausalLM in a new interpreter (after `import mora`) gives `expected`, merged or not."""
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch, mora
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})
assert model.peft_config["default"].base_model_name_or_path == {str(base)!r}
ids = torch.arange(2, 26).reshape(2, 12)
expected = torch.load({str(tmp_path / "expected.pt")!r})
assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-5)
assert torch.allclose(model.merge_and_unload()(input_ids=ids).logits, expected, atol=1e-4)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_S)
    assert result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_trainer_trains_resumes_exactly_saves_and_reloads_in_a_fresh_process(base, tmp_path):
    straight = _trainer(base, tmp_path / "straight", steps=4)
    straight.train()
    expected = {k: v.clone() for k, v in get_peft_model_state_dict(straight.model).items()}
    assert any(v.abs().sum() > 0 for v in expected.values())  # M moved from zero
    resumed = _trainer(base, tmp_path / "resumed", steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    got = get_peft_model_state_dict(resumed.model)
    assert expected.keys() == got.keys()
    assert all(torch.allclose(expected[k], got[k], atol=1e-6) for k in expected)
    straight.model.save_pretrained(tmp_path / "adapter")
    ids = torch.arange(2, 26).reshape(2, 12)
    _check_in_fresh_process(tmp_path / "adapter", base, tmp_path, straight.model.eval()(input_ids=ids).logits.detach())


@pytest.mark.parametrize("chat_template", [False, True])
def test_trl_sft_trainer_trains_mora_also_with_a_chat_template(base, tmp_path, chat_template):
    from trl import SFTConfig, SFTTrainer

    extra = {}
    if chat_template:  # a tokenizer folder whose template adds two special tokens: TRL makes them trainable
        source = copy.deepcopy(fixture_bpe())  # the BPE is cached and shared: never change it in place
        source.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
        source.chat_template = CHAT_TEMPLATE
        source.save_pretrained(tmp_path / "chat")
        extra["chat_template_path"] = str(tmp_path / "chat")
    conversations = [
        [{"role": "user", "content": f"What is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}."}]
        for a in range(4)
        for b in range(4)
    ]
    tokenizer = copy.deepcopy(fixture_bpe())
    tokenizer.chat_template = CHAT_TEMPLATE.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        max_length=64,
        bf16=False,  # TRL's default is bf16 autocast; fp32 here so that the reloaded adapter is compared exactly
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        **extra,
    )
    trainer = SFTTrainer(
        model=str(base),
        args=args,
        train_dataset=Dataset.from_dict({"messages": conversations}),
        processing_class=tokenizer,
        peft_config=_config(),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(loss == loss for loss in losses)  # finite, logged each step
    config = trainer.model.peft_config["default"]
    assert isinstance(config, mora.MoraConfig)
    if chat_template:
        added = trainer.processing_class.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        assert added == [2048, 2049] and set(added) <= set(config.trainable_token_indices["embed_tokens"])
        assert "TrainableTokens" in type(trainer.model.get_input_embeddings()).__name__
    trainer.model.save_pretrained(tmp_path / "adapter")
    if chat_template:  # the base grew by the added tokens: resize it first; the adapter holds those rows
        grown = AutoModelForCausalLM.from_pretrained(base)
        grown.resize_token_embeddings(trainer.model.get_base_model().config.vocab_size)
        reloaded = PeftModel.from_pretrained(grown, tmp_path / "adapter")
        assert len(config.trainable_token_indices["embed_tokens"]) == grown.config.vocab_size - 2048
    else:
        reloaded = mora.load(str(tmp_path / "adapter"))
    ids = torch.tensor([[2, 5, 2048, 9, 2049, 7]]) if chat_template else torch.arange(2, 26).reshape(2, 12)
    assert torch.allclose(reloaded(input_ids=ids).logits, trainer.model.eval()(input_ids=ids).logits, atol=1e-5)
