"""The critic study's signals on features whose answer is known (no model needed)."""

import numpy as np
import torch
import torch.nn.functional as F

from luciddrag.evals.shapesworld.critic_study import appearance_signals, report


def _scene():
    g = torch.Generator().manual_seed(0)
    f_in = F.normalize(torch.randn(8, 32, 32, generator=g), dim=0)
    rgb_in = np.random.default_rng(0).uniform(0, 255, (32, 32, 3)).astype(np.float32)
    return f_in, rgb_in


def test_a_perfect_move_is_found_at_its_target_with_its_appearance():
    f_in, rgb_in = _scene()
    # the whole image shifted 5 px right: the handle's content is exactly at the target
    f_out, rgb_out = torch.roll(f_in, 5, dims=2), np.roll(rgb_in, 5, axis=1)
    s = appearance_signals(f_in, f_out, rgb_in, rgb_out, (10, 10), (15, 10), search=12)
    assert s["md_px"] == 0 and s["md_frac"] == 0
    assert s["match"] > 0.999 and s["disc"] > 0.999 and s["colour"] == 0
    assert s["left"] < 0.9  # what is at the handle now is other content


def test_an_unmoved_image_is_found_at_the_handle_and_left_behind():
    f_in, rgb_in = _scene()
    s = appearance_signals(f_in, f_in.clone(), rgb_in, rgb_in.copy(), (10, 10), (15, 10), search=12)
    assert s["md_px"] == 5 and abs(s["md_frac"] - 1) < 1e-9 and s["left"] > 0.999
    # the search window: content moved beyond it is not found
    far = appearance_signals(f_in, torch.roll(f_in, 9, dims=2), rgb_in, np.roll(rgb_in, 9, axis=1), (10, 10),
                             (19, 10), search=4)
    assert far["md_px"] > 4


def test_report_fits_on_dev_and_reports_test():
    # good: P(real) high and tracked; broken: P(real) low and tracked; unedited: real but not moved
    rows = []
    for i in range(10):
        common = {"kind": "ghost", "family": ("move", "resize")[i % 2], "md_px": 1.0, "length": 10.0, "md_frac": 0.1,
                  "match": 1, "disc": 1, "left": 0, "colour": 1}
        rows += [{**common, "which": "good", "p_real": 0.8 + i / 100},
                 {**common, "which": "bad", "p_real": 0.2 + i / 100},
                 {**common, "which": "input", "p_real": 0.9, "md_px": 10.0, "md_frac": 1.0, "left": 1, "colour": 0}]
    text = report(rows, rows, limit=0.6)
    assert "| p_real | 1.00 | 1.00 | ghost 1.00 |" in text and "| md_frac | 0.50 | 0.50 | ghost 0.50 |" in text
    assert "the node accepts 100% of good, rejects 100% of broken and 100% of unedited inputs" in text
    assert "by kind (discriminator alone, test): ghost 100%" in text
    assert "accepts 100% of good (moves 100%, resizes 100%), rejects 0% of broken and 100% of unedited" in text


def test_a_missing_discriminator_is_one_line_before_any_editing(tmp_path, capsys):
    import pytest

    from luciddrag.evals.shapesworld.critic_study import main

    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "study"), "--discriminator", str(tmp_path / "nowhere")])
    assert exc.value.code == 2 and "discriminator not found" in capsys.readouterr().err
    assert not (tmp_path / "study").exists()  # nothing was built
