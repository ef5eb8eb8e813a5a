"""A damaged MoRA adapter folder, loaded through the public API (`PeftModel.from_pretrained` after `import mora`,
`load_adapter`, `mora.load`), raises one exception type of ours, a ValueError subclass naming the folder, the file
and what is wrong; a healthy folder, another method's folder and a hub id are left to PEFT."""

import json

import pytest
from peft import LoraConfig, PeftModel, get_peft_model

import mora
from mora import MoraAdapterError
from tests.conftest import small_llama

TARGETS = ["q_proj", "up_proj"]


def _base(hidden=24):
    return small_llama(hidden_size=hidden, num_hidden_layers=1, num_key_value_heads=4, max_position_embeddings=2048)


@pytest.fixture
def folder(tmp_path):
    model = get_peft_model(_base(), mora.MoraConfig(r=2, target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _config(folder):
    return json.loads((folder / "adapter_config.json").read_text())


def _write_config(folder, data):
    (folder / "adapter_config.json").write_text(json.dumps(data))


WEIGHTS = "adapter_model.safetensors"
DAMAGE = {  # what is done to the folder -> (the file the message names, what it says)
    "folder missing": (lambda f: f.rename(f.with_name("moved")), "", "no such adapter folder"),
    "config missing": (lambda f: (f / "adapter_config.json").unlink(), "", "no adapter_config.json"),
    "config not JSON": (
        lambda f: (f / "adapter_config.json").write_text('{"r": 2,'),
        "adapter_config.json",
        "not valid JSON",
    ),
    "config a list": (lambda f: _write_config(f, [1, 2]), "adapter_config.json", "not a JSON object"),
    "config without peft_type": (
        lambda f: _write_config(f, {k: v for k, v in _config(f).items() if k != "peft_type"}),
        "adapter_config.json",
        "has no peft_type",
    ),
    "config without compression": (
        lambda f: _write_config(f, {k: v for k, v in _config(f).items() if k != "compression"}),
        "adapter_config.json",
        "incomplete MoRA config, without compression",
    ),
    "unknown operator": (
        lambda f: _write_config(f, {**_config(f), "compression": "rotation"}),
        "adapter_config.json",
        "unknown compression 'rotation'",
    ),
    "r not a positive integer": (
        lambda f: _write_config(f, {**_config(f), "r": -4}),
        "adapter_config.json",
        "r must be a positive integer",
    ),
    "weights missing": (lambda f: (f / WEIGHTS).unlink(), "", "adapter's weights are missing"),
    "weights truncated": (
        lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]),
        WEIGHTS,
        "truncated or damaged",
    ),
    "weights not safetensors": (
        lambda f: (f / WEIGHTS).write_bytes(b"\x00" * 64 + b"not a tensor file"),
        WEIGHTS,
        "not a readable safetensors file",
    ),
}


@pytest.mark.parametrize("entry", ["from_pretrained", "load_adapter", "mora.load"])
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_folder_raises_one_error_naming_folder_file_and_problem(folder, damage, entry):
    spoil, filename, problem = DAMAGE[damage]
    spoil(folder)
    with pytest.raises(MoraAdapterError) as caught:
        if entry == "from_pretrained":
            PeftModel.from_pretrained(_base(), folder)
        elif entry == "load_adapter":
            healthy = folder.with_name("healthy")
            get_peft_model(_base(), mora.MoraConfig(r=2, target_modules=TARGETS)).save_pretrained(healthy)
            PeftModel.from_pretrained(_base(), healthy).load_adapter(folder, adapter_name="other")
        else:
            mora.load(str(folder))
    message = str(caught.value)
    assert isinstance(caught.value, ValueError) and "\n" not in message
    assert str(folder / filename).rstrip("/") in message and problem in message, message


def test_weights_that_do_not_fit_the_model_name_the_folder_and_the_layer(folder):
    expected = rf"^{folder}: MoRA adapter does not fit this model: .*_proj.mora_M.*needs"
    with pytest.raises(MoraAdapterError, match=expected):
        PeftModel.from_pretrained(_base(hidden=32), folder)


def test_healthy_folders_and_other_methods_load_and_hub_ids_are_left_to_peft(folder, tmp_path):
    PeftModel.from_pretrained(_base(), folder)
    get_peft_model(_base(), LoraConfig(r=2, target_modules=TARGETS)).save_pretrained(tmp_path / "lora")
    (tmp_path / "lora" / "adapter_model.safetensors").unlink()  # not ours: PEFT's own error, not MoraAdapterError
    with pytest.raises(Exception) as caught:
        PeftModel.from_pretrained(_base(), tmp_path / "lora")
    assert not isinstance(caught.value, MoraAdapterError)
    with pytest.raises(Exception) as caught:  # a hub id (offline): PEFT's own answer
        PeftModel.from_pretrained(_base(), "someone/some-adapter")
    assert not isinstance(caught.value, MoraAdapterError)
