"""scripts/gpu_check.sh runs end to end on CPU with a tiny UNet and writes the JSON the GPU run will fill in."""
import json
import subprocess

from tests.conftest import REPO, project_env


def test_gpu_check_runs_on_cpu_and_writes_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    r = subprocess.run(["bash", "scripts/gpu_check.sh", "--tiny", "--out", str(out)], cwd=REPO, env=project_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["batch"] == 4
    teacher = result["teacher"]
    assert teacher["plain_images_per_s"] > 0 and teacher["trainer_images_per_s"] > 0
    assert abs(teacher["trainer_over_plain"] - teacher["trainer_images_per_s"] / teacher["plain_images_per_s"]) < 0.01
    assert set(result["memory"]) == {"zero0_peak_gib", "zero2_peak_gib"}  # null on CPU: no CUDA allocator
    stages = result["student_stages"]
    assert set(stages) == {"reflow", "reflow_distill", "progressive", "consistency", "dpo"}
    assert all(stage.get("step_ms", 0) > 0 for stage in stages.values()), stages
