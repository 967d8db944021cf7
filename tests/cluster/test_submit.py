"""``imprag submit``: validation, the submission it builds, and a real job on a local cluster."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from imprag_ray.cli import main
from imprag_ray.submit import build_submission

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_shows_entrypoint_and_runtime_env(capsys):
    rc = main(
        [
            "submit",
            "jobs/tiny_synth_imprag.yaml",
            "train.epochs=7",
            "--address",
            "http://127.0.0.1:1",
            "--cluster",
            "clusters/local.yaml",
            "--env",
            "A=b",
            "--dry-run",
        ]
    )
    assert rc == 0
    sub = json.loads(capsys.readouterr().out)
    assert sub["entrypoint"] == (
        "python -m imprag_ray.cli train --config jobs/tiny_synth_imprag.yaml train.epochs=7"
    )
    env = sub["runtime_env"]
    assert env["working_dir"] == str(ROOT) and "runs/" in env["excludes"] and ".git/" in env["excludes"]
    assert env["env_vars"]["A"] == "b" and env["env_vars"]["PYTHONPATH"] == "."


def test_bad_job_and_bad_arguments_fail_clearly(tmp_path, capsys):
    rc = main(
        ["submit", "jobs/tiny_synth_imprag.yaml", "train.epochs=0", "--address", "http://x", "--dry-run"]
    )
    assert rc == 2 and "train.epochs" in capsys.readouterr().err
    rc = main(
        ["submit", "jobs/tiny_synth_imprag.yaml", "--address", "http://x", "--env", "NOEQUALS", "--dry-run"]
    )
    assert rc == 2 and "KEY=VALUE" in capsys.readouterr().err
    outside = tmp_path / "job.yaml"
    shutil.copy(ROOT / "jobs/tiny_synth_imprag.yaml", outside)
    with pytest.raises(Exception, match="outside the working dir"):
        build_submission(outside, "train", [], ROOT)
    rc = main(
        [
            "submit",
            "jobs/tiny_synth_imprag.yaml",
            "--address",
            "http://x",
            "--cluster",
            "clusters/nope.yaml",
            "--dry-run",
        ]
    )
    assert rc == 2 and "clusters/nope.yaml does not exist" in capsys.readouterr().err


@pytest.mark.multinode
def test_real_submission_runs_the_job_on_a_cluster(tiny_world, tmp_path, capsys):
    """A head with the job server + a worker node; the job trains a few steps and writes a checkpoint."""
    from tests.multinode import local_cluster

    project = tmp_path / "project"
    shutil.copytree(ROOT / "imprag_ray", project / "imprag_ray", ignore=shutil.ignore_patterns("__pycache__"))
    job = yaml.safe_load(Path(tiny_world["job"]).read_text())
    job["output_dir"] = str(tmp_path / "out")
    job["train"].update(epochs=1, warmup_epochs=1, steps_per_epoch=2, eval_every=0)
    job["eval"]["limit"] = 4
    (project / "jobs").mkdir()
    (project / "jobs/job.yaml").write_text("# test job\n" + yaml.safe_dump(job))
    with local_cluster((1, 1), dashboard=True) as cluster:
        rc = main(
            [
                "submit",
                str(project / "jobs/job.yaml"),
                "--address",
                cluster.dashboard_url,
                "--working-dir",
                str(project),
                "--env",
                "RAY_AUTH_MODE=disabled",
            ]
        )
        out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "SUCCEEDED" in out
    assert list((tmp_path / "out" / "checkpoints").glob("epoch-*/config.json")), out[-3000:]
