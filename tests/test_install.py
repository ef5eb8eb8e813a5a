"""The library as a user installs it: a clean venv with only the core dependencies (torch from the same local CPU
wheel, transformers, peft), at the exact lock and at the oldest versions pyproject.toml claims. In it: `import mora`
works without the suite (no hydra, deepspeed, datasets, lm-eval, wandb, matplotlib), and a MoraConfig adapter on a
tiny transformers model trains a step, saves, reloads and merges."""

import re
import shutil
import subprocess
import sys
import venv

import pytest
import tomllib
import yaml

from mora.paths import REPO_ROOT
from tests.conftest import HANG_S

pytestmark = pytest.mark.slow
CHECK = """
import importlib.util, tempfile
import torch, peft, transformers
import mora
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

suite = [m for m in ("hydra", "deepspeed", "datasets", "lm_eval", "wandb", "matplotlib") if importlib.util.find_spec(m)]
assert not suite, f"the core install pulled suite packages: {suite}"
torch.manual_seed(0)
config = LlamaConfig(vocab_size=50, hidden_size=24, intermediate_size=40, num_hidden_layers=1, num_attention_heads=4,
                     max_position_embeddings=32)
model = get_peft_model(LlamaForCausalLM(config), mora.MoraConfig(r=2, compression="rope", task_type="CAUSAL_LM",
                                                                 target_modules=["q_proj", "up_proj"]))
ids = torch.randint(0, 50, (2, 12))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
model(input_ids=ids, labels=ids).loss.backward()
optimizer.step()
model.eval()
expected = model(input_ids=ids).logits
folder = tempfile.mkdtemp()
model.save_pretrained(folder)
torch.manual_seed(0)
reloaded = PeftModel.from_pretrained(LlamaForCausalLM(config), folder)
assert torch.allclose(reloaded(input_ids=ids).logits, expected, atol=1e-6)
merged = reloaded.merge_and_unload()
assert torch.allclose(merged(input_ids=ids).logits, expected, atol=1e-5)
print("ok", torch.__version__, transformers.__version__, peft.__version__)
"""


def _pip(python, *args):
    result = subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-compile", *args], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]


def _core_venv(tmp_path, *requirements: str) -> str:
    """A fresh venv with torch, the core dependencies as `requirements` pin them, and mora from a copy of the source
    (building in the repository would leave build/ there); its python."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "mora", source / "mora", ignore=shutil.ignore_patterns("__pycache__"))
    venv.create(tmp_path / "venv", with_pip=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    _pip(python, "torch==2.13.0", *requirements, str(source))
    return python


def _check(python: str, cwd) -> list[str]:
    """CHECK in `python`: torch, transformers and peft's versions."""
    result = subprocess.run([python, "-c", CHECK], capture_output=True, text=True, cwd=cwd, timeout=HANG_S)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]
    print(result.stdout, file=sys.stderr)
    return result.stdout.split()[1:]


def test_the_core_install_imports_trains_saves_loads_and_merges_at_the_lock(tmp_path):
    python = _core_venv(tmp_path, "-c", str(REPO_ROOT / "requirements.txt"))
    assert _check(python, tmp_path) == ["2.13.0+cpu", "5.23.0", "0.21.2"]


def test_the_oldest_core_install_works_and_the_wheelhouse_upgrades_it_offline_keeping_its_torch(tmp_path):
    # the lower bounds of pyproject.toml's dependencies: a "node" with its own torch and an older stack than the lock
    python = _core_venv(tmp_path, "transformers==4.56.2", "peft==0.20.0")
    assert _check(python, tmp_path) == ["2.13.0+cpu", "4.56.2", "0.20.0"]
    # the wheelhouse (built here, for this Python) installs with --no-index, brings the lock's versions, and leaves
    # the node's torch as it was
    house = tmp_path / "wheelhouse"
    build = [sys.executable, str(REPO_ROOT / "scripts" / "wheelhouse.py"), "--dest", str(house), "--only", "peft"]
    built = subprocess.run([*build, "hydra-core"], capture_output=True, text=True, timeout=HANG_S)
    assert built.returncode == 0, built.stderr[-3000:]
    wheels = sorted(p.name for p in house.glob("*.whl"))
    assert not [w for w in wheels if w.startswith(("torch-", "nvidia", "triton"))]
    assert any(w.startswith("antlr4_python3_runtime-4.9.3-") for w in wheels)  # source-only: built here
    pins = (house / "requirements.txt").read_text().splitlines()[1:]  # the whole closure, at the versions here
    assert {"peft==0.21.2", "hydra-core==1.3.8", "transformers==5.23.0", "antlr4-python3-runtime==4.9.3"} <= set(pins)
    assert len(pins) == len(wheels) and not [p for p in pins if p.startswith("torch==")]
    _pip(python, "--no-index", "--find-links", str(house), "-r", str(house / "requirements.txt"))
    check = "import torch, transformers as t, peft, hydra; print(torch.__version__, t.__version__, peft.__version__)"
    result = subprocess.run([python, "-c", check], capture_output=True, text=True, timeout=HANG_S)
    assert result.stdout.split() == ["2.13.0+cpu", "5.23.0", "0.21.2"], result.stderr[-3000:]


def test_the_conda_environment_pins_what_the_lock_pins():
    # environment.yml (GPU machines) names every package of the suite, dev and slurm extras, each at the lock's pin
    lock = dict(
        line.split("==", 1) for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if "==" in line
    )
    conda = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    pins = dict(line.split("==", 1) for line in pip if "==" in line)
    assert {name: lock.get(name) for name in pins} == pins
    extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = {re.split(r"[<>=\[ ;]", spec, maxsplit=1)[0] for key in ("suite", "dev", "slurm") for spec in extras[key]}
    assert named <= {"torch", *pins}, sorted(named - set(pins))
