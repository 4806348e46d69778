"""The bare lab's pieces that need no lab: its sshd_config is one the real sshd accepts, its private copies cover
what the playbook writes, and the CLI refuses contradictory variants before touching anything.

The bare lab itself (hosts, keys, the playbook over SSH) is exercised in tests/lab/test_deploy_lab.py.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from ha.lab import bare
from ha.lab.cli import lab

SSHD = "/usr/sbin/sshd"


@pytest.mark.skipif(not Path(SSHD).exists() or shutil.which("ssh-keygen") is None,
                    reason="openssh-server / openssh-client not installed")  # fmt: skip
def test_sshd_accepts_the_generated_config(tmp_path: Path) -> None:
    key = tmp_path / "ssh_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cfg = tmp_path / "sshd_config"
    cfg.write_text(bare.sshd_config(key))
    p = subprocess.run([SSHD, "-t", "-f", str(cfg)], capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, p.stderr
    # What sshd will actually use: root by key only, our key file, the pidfile the playbook's reload signals.
    eff = subprocess.run([SSHD, "-T", "-f", str(cfg), "-C", "user=root,host=client,addr=198.51.100.50"],
                         capture_output=True, text=True, timeout=20).stdout  # fmt: skip
    for line in ("permitrootlogin without-password", "passwordauthentication no", "pidfile /run/sshd.pid",
                 f"authorizedkeysfile {bare.AUTHORIZED_KEYS}", f"hostkey {key}"):  # fmt: skip
        assert line in eff.splitlines(), f"{line!r} not in sshd -T output"


def test_private_copies_cover_what_the_playbook_writes(tmp_path: Path) -> None:
    binds = dict((dst, src) for src, dst in bare.binds(tmp_path))
    for d in ("/usr/lib/ocf/resource.d/sipha", "/usr/local/sbin", "/usr/local/lib", "/etc/sysctl.d",
              "/etc/ssh/sshd_config.d", "/var/lib/sipha", "/var/log/sipha", "/etc/systemd/system", "/opt"):  # fmt: skip
        assert binds[d] == str(tmp_path / d.lstrip("/"))
    assert binds[bare.SSHD_CONFIG] == str(tmp_path / "etc/ssh/sshd_config")
    assert "/etc/passwd" not in binds and "/etc/group" not in binds  # useradd renames them: never file-bound


def test_stock_and_bare_exclude_each_other() -> None:
    r = CliRunner().invoke(lab, ["up", "--stock", "--bare", "examples/lab.yaml"])
    assert r.exit_code != 0
    assert "--stock and --bare exclude each other" in r.output
