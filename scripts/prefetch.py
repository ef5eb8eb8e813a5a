"""Download what a profile needs (model weights and tokenizer) into the Hugging Face cache, on a networked machine,
so that training nodes can run offline.

    make prefetch PROFILE=paper
"""

from __future__ import annotations

import argparse
import os
import sys

from hydra import compose, initialize_config_dir

from mora.paths import CONFIG_DIR


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="paper")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. model=llama_1b")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"profile={args.profile}", *args.overrides])
    if not cfg.model.pretrained:
        print(f"profile {args.profile}: model {cfg.model.name} is built from config; nothing to download")
        return 0
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.pop(key, None)
    from huggingface_hub import snapshot_download

    path = snapshot_download(str(cfg.model.pretrained), allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    print(f"{cfg.model.pretrained} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
