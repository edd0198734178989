"""The "$6M" what-if page (experiments/whatif.py): the one-line utilisation check is computed from the
catalog and the cost model, R1's published RL cost is arithmetic on its claim, and the page names the
critiques it answers."""
from __future__ import annotations

import pytest

from dsref.experiments import whatif
from dsref.experiments.registry import load_claims


def test_pretrain_check_is_computed_not_pasted():
    c = load_claims()
    chk = whatif.pretrain_check(float(c["dsv3_tr_pretrain_gpuh"]["value"]))
    # ISCA'25 Table 2: ~250 GFLOP/token; 14.8T tokens over 2.664M H800-hours -> ~39% of the 989 TFLOP/s bf16 peak
    assert chk["gflop_per_token"] == pytest.approx(250, rel=0.01)
    assert chk["frac_bf16"] == pytest.approx(0.39, abs=0.01)
    assert chk["frac_fp8"] == pytest.approx(chk["frac_bf16"] / 2, rel=0.01)  # fp8 peak 1,979 ~ 2 x 989
    # twice the hours -> half the utilisation: the check follows its inputs
    assert whatif.pretrain_check(2 * 2.664e6)["frac_bf16"] == pytest.approx(chk["frac_bf16"] / 2)


def test_six_million_page(tmp_path):
    (tmp_path / "img").mkdir()
    whatif.write_six_million_page(tmp_path)
    text = (tmp_path / "whatif-six-million.md").read_text()
    for name in ("Bernstein", "Hassabis", "SemiAnalysis", "R1 Nature paper", "One-line check"):
        assert name in text, name
    r1 = load_claims()["r1_rl_cost"]["value"]
    gpuh = (r1["r1_zero_hours"] + r1["r1_hours"]) * r1["gpus"] + r1["sft_data_gpuh"]
    assert f"{gpuh:,} H800-hours" in text and "$294.7K" in text  # 147,336 x $2 = $294,672
    assert "39% of the H800" in text and "goodput" not in text
