"""The end-of-demo summary table reads metrics.json correctly (2-D and image metrics)."""
from flows.summary import summary_lines


def test_summary_table_shows_ratios_per_model_and_nfe():
    metrics = {"dataset": "checkerboard", "floor": {"sw2": 0.04, "mmd": 0.003},
               "models": {"teacher": {"nfe": {"1": {"sw2_ratio": 14.5}, "64": {"sw2_ratio": 1.61}}},
                          "reflow": {"nfe": {"1": {"sw2_ratio": 2.25}}}},
               "straightness": {"teacher": 0.99, "reflow": 0.05}}
    lines = summary_lines(metrics)
    assert "sw2 as a multiple of the floor" in lines[0] and "0.04" in lines[0]
    assert lines[1].split() == ["model", "NFE", "1", "NFE", "64"]
    assert lines[3].split() == ["teacher", "14.50", "1.61"]
    assert lines[4].split() == ["reflow", "2.25", "-"]
    assert "reflow 0.050" in lines[-1]


def test_summary_uses_fd_for_images():
    lines = summary_lines({"dataset": "digits", "floor": {"fd": 2.0},
                           "models": {"teacher": {"nfe": {"8": {"fd_ratio": 3.0}}}}})
    assert "fd as a multiple" in lines[0] and lines[3].split() == ["teacher", "3.00"]
