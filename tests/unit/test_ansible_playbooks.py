"""The Ansible tree and the Vagrantfile, checked by their own tools: ansible-lint (production profile),
ansible-playbook --syntax-check on a real render, and vagrant validate.

Why the real tools: YAML that parses is not a playbook Ansible accepts, and a Vagrantfile is Ruby. A missing
binary skips with the Debian package to install (``make test`` installs them); it never passes silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ha import model, render

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
VAGRANT = REPO / "vagrant"


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package {package}; `make test` installs it)")
    return path


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def lab_render(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("render") / "lab"
    render.write(model.load(REPO / "examples/lab.yaml"), out)
    return out


# No ansible.cfg lookups outside the repo, no galaxy/network access: offline, deterministic runs.
ANSIBLE_ENV = {"ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_LOCAL_TEMP": "/tmp/sipha-ansible-tmp",
               "ANSIBLE_NOCOLOR": "1"}  # fmt: skip


def test_ansible_lint_production_profile_is_clean() -> None:
    lint = _need("ansible-lint", "ansible-lint")
    out = _run([lint, "--offline", "--profile", "production", "--nocolor", "."], ANSIBLE, ANSIBLE_ENV)
    assert "Passed with production profile" in out, out


@pytest.mark.parametrize("manager", ["systemd", "lab"])
def test_site_playbook_syntax_check(lab_render: Path, manager: str) -> None:
    playbook = _need("ansible-playbook", "ansible")
    out = _run([playbook, "--syntax-check", "-i", str(lab_render / "inventory.ini"), "site.yml",
                "-e", f"sipha_render_dir={lab_render}", "-e", f"sipha_cluster_yaml={REPO / 'examples/lab.yaml'}",
                "-e", f"sipha_service_manager={manager}"], ANSIBLE, ANSIBLE_ENV)  # fmt: skip
    assert "playbook: site.yml" in out


def test_site_playbook_lists_every_role_for_each_host_kind(lab_render: Path) -> None:
    playbook = _need("ansible-playbook", "ansible")
    out = _run([playbook, "--list-tasks", "-i", str(lab_render / "inventory.ini"), "site.yml",
                "-e", f"sipha_render_dir={lab_render}", "-e", f"sipha_cluster_yaml={REPO / 'examples/lab.yaml'}"],
               ANSIBLE, ANSIBLE_ENV)  # fmt: skip
    for task in ("common : Let the proxy bind the VIP", "zookeeper : Install zoo.cfg from the render",
                 "cluster : Corosync on the nodes", "proxy : Install the rendered proxy configuration",
                 "sipha : Install the OCF agents", "Load the rendered CIB when it differs"):  # fmt: skip
        assert task in out, f"{task!r} missing from --list-tasks"


def test_vagrantfile_validates(tmp_path: Path, lab_render: Path) -> None:
    vagrant = _need("vagrant", "vagrant")
    env = {"VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
           "SIPHA_RENDER_DIR": str(tmp_path / "render")}  # fmt: skip
    # With no hypervisor on the machine (CI) Vagrant cannot pick a provider at all, so provider blocks are
    # left out of validation; with VirtualBox or vagrant-libvirt present, the plain validate runs too.
    out = _run([vagrant, "validate", "--ignore-provider"], VAGRANT, env)
    assert "Vagrantfile validated successfully" in out
    assert (tmp_path / "render" / "inventory.ini").is_file(), "the Vagrantfile renders a missing inventory"
    plugins = subprocess.run([vagrant, "plugin", "list"], capture_output=True, text=True, timeout=120,
                             env={**os.environ, "VAGRANT_CHECKPOINT_DISABLE": "1"}).stdout  # fmt: skip
    if shutil.which("VBoxManage") or "vagrant-libvirt" in plugins:
        out = _run([vagrant, "validate"], VAGRANT, {k: v for k, v in env.items() if k != "VAGRANT_HOME"})
        assert "Vagrantfile validated successfully" in out
