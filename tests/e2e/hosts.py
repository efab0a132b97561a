"""Hosts that share nothing, built on this machine with Linux namespaces (root and iproute2, as
on CI): each host is a network namespace with its own name (`unshare --uts`), address and
/etc/hosts (`ip netns exec` mounts /etc/netns/NS/hosts over it); a bridge in the control host
joins them, and one more link gives this process (the test) the control host's address. Each
host runs its processes from its own folder; the only things between hosts are the network
services the test starts on the control host. Everything is torn down on exit, even after a
failure: the processes in each namespace, the namespaces, the links and the hosts files."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

SUBNET = "10.77.0"
CONTROL_IP = f"{SUBNET}.1"
# The names every host resolves to the control host (the compose file's service names).
SERVICES = ("control", "mlflow", "postgres", "redis", "s3")


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


class Hosts:
    """`Hosts(["w1", "w2"])`: a control host and these workers, entered as a context."""

    def __init__(self, workers: list[str]):
        tag = os.getpid() % 100_000
        self.names = ["control", *workers]
        self.ns = {name: f"pipe{tag}-{name}" for name in self.names}
        self.ip = {"control": CONTROL_IP}
        self.ip |= {w: f"{SUBNET}.{11 + i}" for i, w in enumerate(workers)}
        self.links = [f"pv{tag}{i}" for i in range(len(self.names))]  # <= 15 characters
        self.procs: list[tuple[str, subprocess.Popen]] = []

    def __enter__(self) -> Hosts:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        ctl = self.ns["control"]
        for ns in self.ns.values():
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "-n", ctl, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", ctl, "addr", "add", f"{CONTROL_IP}/24", "dev", "br0")
        _sh("ip", "-n", ctl, "link", "set", "br0", "up")
        ends = [(self.ns[w], self.ip[w]) for w in self.names[1:]] + [("", f"{SUBNET}.254")]
        for link, (ns, ip) in zip(self.links, ends, strict=False):
            _sh("ip", "link", "add", f"{link}a", "type", "veth", "peer", "name", f"{link}b")
            _sh("ip", "link", "set", f"{link}a", "netns", ctl)
            _sh("ip", "-n", ctl, "link", "set", f"{link}a", "master", "br0")
            _sh("ip", "-n", ctl, "link", "set", f"{link}a", "up")
            inside = ["ip", "-n", ns] if ns else ["ip"]  # "": this process's own namespace
            if ns:
                _sh("ip", "link", "set", f"{link}b", "netns", ns)
            _sh(*inside, "addr", "add", f"{ip}/24", "dev", f"{link}b")
            _sh(*inside, "link", "set", f"{link}b", "up")
        lines = ["127.0.0.1 localhost", f"{CONTROL_IP} {' '.join(SERVICES)}"]
        lines += [f"{self.ip[w]} {w}" for w in self.names[1:]]
        for ns in self.ns.values():
            folder = Path("/etc/netns") / ns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def _wrap(self, host: str, command: list[str]) -> list[str]:
        named = 'hostname "$0" && exec "$@"'
        return [
            "ip",
            "netns",
            "exec",
            self.ns[host],
            "unshare",
            "--uts",
            "--",
            "sh",
            "-c",
            named,
            host,
            *command,
        ]

    def start(self, host: str, command: list[str], env: dict, cwd: Path, log: Path):
        """`command` running on `host` in the background, its output in `log`."""
        proc = subprocess.Popen(
            self._wrap(host, command),
            env=env,
            cwd=cwd,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append((host, proc))
        return proc

    def run(self, host: str, command: list[str], env: dict, cwd: Path, timeout: int = 600):
        """`command` run on `host` to its end; its CompletedProcess (text)."""
        return subprocess.run(
            self._wrap(host, command),
            env=env,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def lose(self, host: str) -> None:
        """The host is lost: every process in its namespace ends at once (SIGKILL)."""
        pids = subprocess.run(
            ["ip", "netns", "pids", self.ns[host]], capture_output=True, text=True
        ).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        for host in self.names:
            if Path(f"/run/netns/{self.ns[host]}").exists():
                self.lose(host)
        for _, proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        time.sleep(0.5)
        for ns in self.ns.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)
        for link in self.links:  # the root end dies with its peer; this is for a half build
            subprocess.run(["ip", "link", "del", f"{link}b"], capture_output=True)
