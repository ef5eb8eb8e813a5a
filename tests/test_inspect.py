"""mora.inspect on LLaMA-2-7B (meta device): the figures of PAPER.md §3.4."""

import pytest
from hydra import compose, initialize_config_dir

from mora.inspect import layer_rows, render, render_budget, summarise
from mora.paths import CONFIG_DIR


def _compose(*overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="inspect", overrides=list(overrides))


@pytest.mark.parametrize(
    "r,compression,lora,mora,r_hats",
    [
        (8, "rope", 19_988_480, 20_014_592, {4096: 256, 11008: 348}),
        (256, "sharing", 639_631_360, 639_433_088, {4096: 1448, 11008: 1966}),
    ],
)
def test_llama2_7b_figures(r, compression, lora, mora, r_hats):
    cfg = _compose("model=llama2_7b", "adapter=mora", f"adapter.r={r}", f"adapter.compression={compression}")
    rows, trainable = layer_rows(cfg)
    assert len(rows) == 32 * 7
    assert sum(row.lora for row in rows) == lora
    assert sum(row.mora for row in rows) == mora == trainable
    for row in rows:
        assert row.r_hat == r_hats[max(row.d_in, row.d_out)]
    summary = summarise(rows)
    assert len(summary) == 7 and sum(row.mora for row in summary) == mora
    assert render(summary, trainable, cfg).row_count == 8


def test_inspect_refuses_non_mora_adapters():
    with pytest.raises(ValueError, match="use adapter=mora or remora"):
        layer_rows(_compose("adapter=lora"))


def test_cli_runs(capsys):
    import sys

    from mora.inspect import main

    argv = sys.argv
    sys.argv = ["mora.inspect", "rows=summary"]
    try:
        main()
    finally:
        sys.argv = argv
    out = capsys.readouterr().out
    assert "tiny_llama" in out and "total" in out


def test_any_other_method_beside_lora_at_its_budget():
    cfg = _compose("model=llama2_7b", "adapter=miss", "adapter.r=256", "adapter.args.r=470")
    table = render_budget(cfg)
    assert table.row_count == 2 and "at LoRA's budget r=256" in str(table.title)
    cells = [list(column.cells) for column in table.columns]
    assert cells[0] == ["miss", "lora"] and cells[2] == ["639,139,840", "639,631,360"] and cells[3][0] == "0.999"
    with pytest.raises(ValueError, match="adapter=fft has no r"):
        render_budget(_compose("adapter=fft"))
