"""Real `redis-server` processes on free local ports with their data in folders, for tests, benchmarks and
trying the shared backend on one machine: one server, or a Redis Cluster of several; started, stopped,
killed and restarted (same port, same data) as an operator would, so faults are the servers' own."""
from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path


def redis_server_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(bus: bool = False) -> int:
    """A free port; with `bus`, one whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus or (port + 10000 <= 65535 and _bindable(port + 10000)):
            return port


class RedisProcess:
    def __init__(self, data_dir: str | Path, maxmemory_policy: str = "noeviction", extra_args: tuple[str, ...] = ()):
        binary = redis_server_binary()
        if binary is None:
            raise FileNotFoundError("no redis-server (or valkey-server) on PATH: apt-get install -y redis-server")
        self.binary, self.data_dir, self.policy, self.extra_args = binary, Path(data_dir), maxmemory_policy, extra_args
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = _free_port(bus="--cluster-enabled" in extra_args)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self, timeout_s: float = 20) -> None:
        """Start (or restart) on the same port and data: appendonly, so a restart keeps every commit."""
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.data_dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", self.policy,
             "--protected-mode", "no", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s:.0f} s")

    def stop(self) -> None:
        """SIGTERM: the server finishes its append-only file and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)

    def kill(self) -> None:
        """SIGKILL: the server dies as in a crash, with no chance to answer or finish anything."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


NODE_TIMEOUT_MS = 1000  # how long a silent node takes to be declared failed (Redis's default: 15 s)


def _cli() -> str:
    cli = shutil.which("redis-cli") or shutil.which("valkey-cli")
    if cli is None:
        raise FileNotFoundError("no redis-cli (or valkey-cli) on PATH: apt-get install -y redis-tools")
    return cli


class RedisClusterProcess:
    """A Redis Cluster of `masters` primaries with `replicas` replicas each, one `redis-server` per node,
    created with `redis-cli --cluster create` as an operator would. Nodes keep serving the slots they
    hold while another is down (`cluster-require-full-coverage no`: see docs/scale-out.md)."""

    def __init__(self, data_dir: str | Path, masters: int = 3, replicas: int = 0, timeout_s: float = 60):
        cli, self.nodes = _cli(), []
        options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                   "--cluster-node-timeout", str(NODE_TIMEOUT_MS), "--cluster-require-full-coverage", "no")
        try:
            for i in range(masters * (1 + replicas)):
                self.nodes.append(RedisProcess(Path(data_dir) / f"node{i}", extra_args=options))
            subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
                            "--cluster-replicas", str(replicas), "--cluster-yes"],
                           check=True, capture_output=True, timeout=timeout_s)
            self.wait_until_serving(timeout_s)
            self.wait_replicated(timeout_s)  # a replica that never synced refuses to take over
        except BaseException:
            self.stop()
            raise
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @staticmethod
    def _cli(node: RedisProcess, *command: str) -> str:
        return subprocess.run([_cli(), "-p", str(node.port), *command], capture_output=True, text=True,
                              timeout=5, check=False).stdout  # a node down answers nothing

    def _info(self, node: RedisProcess) -> dict[str, str]:
        out = self._cli(node, "cluster", "info")
        return dict(line.strip().split(":", 1) for line in out.splitlines() if ":" in line)

    def running(self) -> list[RedisProcess]:
        return [n for n in self.nodes if n.process is not None and n.process.poll() is None]

    def _owners_running(self) -> bool:
        """Whether every node that owns slots, as a running node sees the cluster, is itself running."""
        ports = {n.port for n in self.running()}
        for line in self._cli(self.running()[0], "cluster", "nodes").splitlines():
            fields = line.split()
            owner = len(fields) > 8 and "master" in fields[2]  # a primary with slot ranges
            if owner and ("fail" in fields[2] or int(fields[1].split("@")[0].rsplit(":", 1)[1]) not in ports):
                return False
        return True

    def _poll(self, ready, what: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not {what} within {timeout_s:.0f} s")
            time.sleep(0.1)

    def wait_until_serving(self, timeout_s: float = 60) -> None:
        """Until every slot is served by a running primary, as every running node sees it (after a
        create, a restart, or a primary's death and its replica's promotion)."""
        def ready() -> bool:
            infos = [self._info(n) for n in self.running()]
            return bool(infos) and all(i.get("cluster_state") == "ok" and i.get("cluster_slots_ok") == "16384"
                                       for i in infos) and self._owners_running()

        self._poll(ready, "serve every slot", timeout_s)

    def wait_replicated(self, timeout_s: float = 30) -> None:
        """Until every replica has received everything its primary wrote (replication is asynchronous)."""
        def ready() -> bool:
            for node in self.primaries():
                info = dict(line.split(":", 1) for line in self._cli(node, "info", "replication").split() if ":" in line)
                offset = info["master_repl_offset"]
                replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
                if any("state=online" not in r or f"offset={offset}," not in r for r in replicas):
                    return False
            return True

        self._poll(ready, "replicate", timeout_s)

    def primaries(self) -> list[RedisProcess]:
        return [n for n in self.running() if "role:master" in self._cli(n, "info", "replication")]

    def flush(self) -> None:
        """Empty every primary (their replicas follow), as between two tests."""
        for node in self.primaries():
            self._cli(node, "flushall")

    def node(self, port: int) -> RedisProcess:
        return next(n for n in self.nodes if n.port == port)

    def owner(self, slot: int) -> RedisProcess:
        """The primary serving `slot`, as the first running node sees the cluster."""
        for line in self._cli(self.running()[0], "cluster", "nodes").splitlines():
            fields = line.split()
            for span in fields[8:] if "master" in fields[2] else ():
                first, _, last = span.partition("-")
                if first.isdigit() and int(first) <= slot <= int(last or first):
                    return self.node(int(fields[1].split("@")[0].rsplit(":", 1)[1]))
        raise RuntimeError(f"no primary serves slot {slot}")

    def move_slot(self, slot: int, target: RedisProcess, keys_per_step: int = 1, pause_s: float = 0.0) -> None:
        """Migrate `slot` to `target` as `redis-cli --cluster reshard` does, `keys_per_step` keys at a time
        with `pause_s` between steps: meanwhile clients get ASK for keys already moved (TRYAGAIN for a
        multi-key command over both halves), then MOVED once every node has learnt the new owner."""
        import redis  # the redis extra: keys are bytes, which redis-cli's text output would not carry

        source = self.owner(slot)
        if source.port == target.port:
            return
        src, dst = (redis.Redis(port=n.port, socket_timeout=10) for n in (source, target))
        source_id, target_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, keys_per_step):
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            time.sleep(pause_s)
        for node in (target, source, *self.primaries()):  # the owners first, as redis-cli does
            redis.Redis(port=node.port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisClusterProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
