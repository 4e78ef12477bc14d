"""`submit` before anything is sent: the config validated locally, secrets and bulk left out of the upload
(listed by Ray's own walker), the upload's size printed and capped. No cluster needed."""

from __future__ import annotations

import pytest

import tract_dist.submit as submit
from tract_dist.cli import main

pytestmark = [pytest.mark.timeout(60)]

SECRETS_AND_BULK = [
    ".env", ".env.production", ".netrc", "id_rsa", "id_rsa.pub", "keys/id_ed25519", ".ssh/config", ".aws/credentials",
    "certs/server.pem", "certs/tls.key", "token", "hf.token", ".git-credentials", "mlflow.db", "mlflow.db-journal",
    "runs/train-1/checkpoints/step-2/zero.pt", "outputs/x.txt", "sub/checkpoints/a.bin", ".git/config",
    "dist/tract_dist-0.1-py3-none-any.whl", "model/model.safetensors", ".venv/bin/python", "a/__pycache__/x.pyc",
]
KEPT = ["tract_dist/__init__.py", "tract_dist/data/score_tokens.py", "configs/job.yaml", "README.md",
        "data/quickstart/sample.jsonl", "tokens_doc.md"]


@pytest.fixture
def workdir(tmp_path):
    for rel in SECRETS_AND_BULK + KEPT:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x" * 10)
    (tmp_path / "configs" / "job.yaml").write_text("model:\n  name_or_path: tiny-llama\n")
    return tmp_path


def test_upload_leaves_out_secrets_and_bulk(workdir):
    plan = submit.plan_upload(workdir)
    got = sorted(str(p.relative_to(workdir)) for p in plan.files)
    assert got == sorted(KEPT)
    assert plan.total_bytes == sum((workdir / k).stat().st_size for k in KEPT)


class _NoClient:
    def __init__(self):
        self.jobs = []

    def submit_job(self, **kwargs):
        self.jobs.append(kwargs)
        return "job-1"


def test_submit_validates_prints_and_caps_the_upload(workdir, monkeypatch, capsys):
    client = _NoClient()
    monkeypatch.setattr(submit, "_client", lambda address: client)
    monkeypatch.chdir(workdir)
    cfg = "configs/job.yaml"

    # a bad config fails here, before any request
    assert main(["submit", "--address", "http://127.0.0.1:1", cfg, "training.learning_rate=fast"]) == 2
    assert "training.learning_rate" in capsys.readouterr().err and not client.jobs

    assert main(["submit", "--address", "http://127.0.0.1:1", cfg]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == "job-1"
    assert f"[submit] working_dir upload: {len(KEPT)} files, 0.00 MiB" in captured.err
    env = client.jobs[0]["runtime_env"]
    assert ".env" in env["excludes"] and "mlflow.db*" in env["excludes"] and env["working_dir"] == "."

    (workdir / "big.bin").write_bytes(b"\0" * (3 << 20))
    assert main(["submit", "--address", "http://127.0.0.1:1", cfg, "--max-upload-mb", "2"]) == 2
    err = capsys.readouterr().err
    assert "over the 2 MiB limit" in err and "big.bin (3.0 MiB)" in err and "--force" in err
    assert len(client.jobs) == 1
    assert main(["submit", "--address", "http://127.0.0.1:1", cfg, "--max-upload-mb", "2", "--force"]) == 0
    assert main(["submit", "--address", "http://127.0.0.1:1", cfg, "--max-upload-mb", "2",
                 "--exclude", "*.bin"]) == 0
    assert len(client.jobs) == 3
