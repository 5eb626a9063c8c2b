"""`node-agent wizard` through a real terminal (pexpect) and non-interactively."""

import os
import sys
from pathlib import Path

import pytest

from node_agent import hpc_config as hc

pexpect = pytest.importorskip("pexpect", reason="pip install pexpect")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fake_cluster(tmp_path):
    """A PATH with a fake `sinfo` (CPU + GPU partitions) and a fake `apptainer`."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "sinfo").write_text(
        "#!/bin/sh\nprintf 'batch*|(null)|up\\ngpu|gpu:a100:4(S:0-1)|up\\nlong|(null)|up\\n'\n"
    )
    (bindir / "apptainer").write_text("#!/bin/sh\necho 'apptainer version 1.4.5'\n")
    for f in bindir.iterdir():
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NODE_AGENT")}
    env.update(PATH=f"{bindir}:/usr/bin:/bin", PYTHONPATH=str(REPO), HOME=str(tmp_path), TERM="dumb")
    return env


def spawn(args, env):
    return pexpect.spawn(
        sys.executable,
        ["-m", "node_agent.cli", "wizard", *args],
        env=env,
        encoding="utf-8",
        timeout=20,
        dimensions=(50, 200),
    )


def test_interactive_wizard_real_terminal(tmp_path, fake_cluster):
    out = tmp_path / "conf" / "hpc.toml"
    child = spawn(["--output", str(out)], fake_cluster)
    child.expect("container runtimes found: apptainer")
    child.expect(r"Slurm partitions: batch, gpu, long \(default batch\); with GPUs: gpu")
    child.expect(r"inside an Apptainer/Singularity container\? \[Y/n\]: ")
    child.sendline("")
    child.expect(r"Container runtime \[apptainer\]: ")
    child.sendline("")
    child.expect(r"makes the runtime available .*\[none\]: ")
    child.sendline("module load apptainer/1.4")
    child.expect(r"Image for compute nodes \(.sif\) \[none\]: ")
    child.sendline("")  # required: asked again
    child.expect("an answer is required")
    child.expect(r"Image for compute nodes")
    child.sendline("images/relative.sif")
    child.expect("must be an absolute path")
    child.sendline("/opt/images/cpu.sif")
    child.expect(r"Image for GPU nodes .*\[none\]: ")
    child.sendline("/opt/images/gpu.sif")
    child.expect(r"Home directory inside the container \[/home/jovyan\]: ")
    child.sendline("")
    child.expect(r"Isolation .*\[contain-pid\]: ")
    child.sendline("everything")
    child.expect("must be one of")
    child.sendline("containall")
    child.expect(r"Scratch directory .*\[~/jupyterhub-hpc\]: ")
    child.sendline(str(tmp_path / "scratch"))
    child.expect(r"home directory per user\? \[Y/n\]: ")
    child.sendline("maybe")
    child.expect("please answer y or n")
    child.sendline("y")
    child.expect(r"persistent overlay image\? \[Y/n\]: ")
    child.sendline("")
    child.expect(r"Overlay size \[2G\]: ")
    child.sendline("big")
    child.expect("must be like '2G' or '512M', got 'big'")
    child.sendline("512M")
    child.expect(r"nbgrader exchange directory .*\[none\]: ")
    child.sendline("/srv/nbgrader/exchange")
    child.expect(r"Debug logging\? \[y/N\]: ")
    child.sendline("")
    child.expect(r"Slurm partition for notebook jobs \[batch\]: ")
    child.sendline("nosuch")
    child.expect("unknown partition; sinfo shows: batch, gpu, long")
    child.sendline("long")
    child.expect(r"Slurm partition for GPU jobs .*\[gpu\]: ")
    child.sendline("")
    child.expect(r"Job wall time \[8:00:00\]: ")
    child.sendline("2:00:00")
    child.expect(r"Job memory \[4G\]: ")
    child.sendline("")
    child.expect("wrote .*hpc.toml")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    c = hc.load_config(out)
    assert c.container.load_command == "module load apptainer/1.4"
    assert c.container.image == "/opt/images/cpu.sif"
    assert c.container.gpu_image == "/opt/images/gpu.sif"
    assert c.container.contain == "containall"
    assert c.storage.scratch_dir == str(tmp_path / "scratch")
    assert c.overlay.size == "512M"
    assert c.nbgrader.exchange_dir == "/srv/nbgrader/exchange"
    snippet = (out.parent / "jupyterhub_config_snippet.py").read_text()
    assert "c.SlurmBrokerSpawner.req_partition = 'long'" in snippet
    assert "c.SlurmBrokerSpawner.req_runtime = '2:00:00'" in snippet
    assert f"node-agent launch --config {out} --" in snippet
    assert "'req_partition': 'gpu'" in snippet
    compile(snippet, "snippet", "exec")


def test_interactive_eof_writes_nothing(tmp_path, fake_cluster):
    out = tmp_path / "hpc.toml"
    child = spawn(["--output", str(out)], fake_cluster)
    child.expect(r"\[Y/n\]: ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0
    assert not out.exists()


def test_non_interactive_flags(tmp_path, fake_cluster):
    out = tmp_path / "hpc.toml"
    child = spawn(
        [
            "--non-interactive",
            "--output",
            str(out),
            "--image",
            "/opt/cpu.sif",
            "--scratch-dir",
            str(tmp_path / "s"),
            "--overlay-size",
            "1G",
            "--contain",
            "contain",
            "--no-create-home",
            "--debug",
            "--load-command",
            "module load singularity",
            "--runtime",
            "singularity",
            "--partition",
            "batch",
            "--gpu-partition",
            "none",
        ],
        fake_cluster,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    c = hc.load_config(out)
    assert (c.container.image, c.container.runtime, c.container.contain) == ("/opt/cpu.sif", "singularity", "contain")
    assert c.container.load_command == "module load singularity"
    assert c.overlay.size_bytes == 1 << 30
    assert c.storage.create_home is False and c.logging.debug is True
    snippet = (tmp_path / "jupyterhub_config_snippet.py").read_text()
    assert "req_partition = 'batch'" in snippet and "gres" not in snippet


def test_non_interactive_defaults_from_cluster(tmp_path, fake_cluster):
    out = tmp_path / "hpc.toml"
    child = spawn(["--non-interactive", "-o", str(out), "--image", "/opt/cpu.sif"], fake_cluster)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    c = hc.load_config(out)
    assert c.container.runtime == "apptainer" and c.container.load_command == ""
    snippet = (tmp_path / "jupyterhub_config_snippet.py").read_text()
    assert "req_partition = 'batch'" in snippet and "'req_partition': 'gpu'" in snippet


def test_no_container_mode(tmp_path, fake_cluster):
    out = tmp_path / "hpc.toml"
    child = spawn(["--non-interactive", "-o", str(out), "--no-container", "--no-inspect"], fake_cluster)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    c = hc.load_config(out)
    assert not c.container.enabled and not c.overlay.enabled


def test_invalid_answers_write_nothing(tmp_path, fake_cluster):
    out = tmp_path / "hpc.toml"
    # no image in non-interactive mode: validation fails, names the option
    child = spawn(["--non-interactive", "-o", str(out), "--no-inspect"], fake_cluster)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    assert "container.image" in child.before
    assert not out.exists() and not (tmp_path / "jupyterhub_config_snippet.py").exists()


def test_refuses_to_overwrite_without_force(tmp_path, fake_cluster):
    out = tmp_path / "hpc.toml"
    out.write_text("# mine\n")
    args = ["--non-interactive", "-o", str(out), "--image", "/opt/cpu.sif", "--no-inspect"]
    child = spawn(args, fake_cluster)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 1 and "use --force" in child.before
    assert out.read_text() == "# mine\n"
    child = spawn(args + ["--force"], fake_cluster)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    hc.load_config(out)
