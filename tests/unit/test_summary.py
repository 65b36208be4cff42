"""The end-of-demo leaderboard reads metrics.json: intervals, ties, below-floor flags (2-D and image metrics)."""
from components.evaluation.report import summary_lines


def _cell(ratio, lo, hi, verdict, **extra):
    return {"sw2_ratio": ratio, "sw2_ratio_ci": [lo, hi], "vs_teacher_best": verdict, "sampler": "heun/edm", **extra}


def test_summary_table_shows_best_ratio_interval_and_tie_per_model_and_nfe():
    metrics = {"dataset": "checkerboard", "floor": {"sw2": 0.04, "mmd": 0.003}, "floor_sd": {"sw2": 0.004},
               "floor_draws": 10, "n_samples": 10000,
               "models": {"teacher": {"nfe": {"1": {}, "64": {}},
                                      "best": {"1": _cell(14.5, 13.0, 16.0, "worse"),
                                               "64": _cell(1.61, 1.4, 1.8, "tie")}},
                          "reflow": {"nfe": {"1": {}}, "best": {"1": _cell(1.5, 1.3, 1.7, "tie")}}},
               "teacher_best": {"nfe": 64, "sampler": "heun/edm", "sw2_ratio": 1.61, "sw2_ratio_ci": [1.4, 1.8]},
               "straightness": {"teacher": 0.99, "teacher_ci": [0.9, 1.1], "reflow": 0.05}}
    lines = summary_lines(metrics)
    assert "sw2 as a multiple of the floor" in lines[0] and "0.04 +- 0.004" in lines[0]
    assert lines[2].split() == ["model", "NFE", "1", "NFE", "64"]
    assert lines[4].split() == ["teacher", "14.50", "[13.00,16.00]", "1.61", "[1.40,1.80]="]
    assert lines[5].split() == ["reflow", "1.50", "[1.30,1.70]=", "-"]
    assert "NFE 64 with heun/edm: 1.61 [1.40, 1.80]" in lines[6]
    assert "reflow 0.050" in lines[-1] and "teacher_ci" not in lines[-1]


def test_summary_uses_fd_for_images_and_flags_below_floor():
    lines = summary_lines({"dataset": "digits", "floor": {"fd": 2.0},
                           "models": {"teacher": {"nfe": {"8": {}},
                                                  "best": {"8": {"fd_ratio": 0.4, "fd_ratio_ci": [0.3, 0.5],
                                                                 "fd_below_floor": True}}}}})
    assert "fd as a multiple" in lines[0] and lines[4].split() == ["teacher", "0.40", "[0.30,0.50]!"]
