"""A real single-node SLURM for tests: a session fixture that starts munged, slurmctld, slurmd.

    from slurm_cluster import slurm_cluster   # in a test module; then use the fixture
    python tests/slurm_cluster.py             # start one by hand, print its SLURM_CONF, Ctrl-C stops it

Everything lives in a fresh folder (config, munge key and socket, state, logs) with private
ports, so it neither needs nor touches a system SLURM. The node is this host, declared with
64 CPUs and 4 "GPUs" (GRES backed by /dev/null-like files): more than the machine has, so the
sbatch scripts' default requests are accepted unchanged (SlurmdParameters=config_overrides);
the test jobs are tiny. TF sees no GPU behind the fake GRES. Daemons are stopped by PID.
If the binaries are missing, .ci/slurm_setup.sh is tried once (set SEMISEG_SLURM_INSTALL=0 to
forbid it); the fixture skips, saying why, only when SLURM still cannot run.
"""
import os
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")
START_TIMEOUT_S = 60
START_ATTEMPTS = 3
FAKE_GPU_FILES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/urandom")


def missing_binaries():
    return [name for name in BINARIES if shutil.which(name) is None]


def free_ports(count):
    """`count` distinct free ports (all held open together, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


CRED_EXPIRE_S = 10


def write_config(root, host):
    """slurm.conf + gres.conf for one node named `host`, all paths under `root`."""
    conf = os.path.join(root, "slurm.conf")
    controller_port, node_port = free_ports(2)
    lines = [
        "ClusterName=semiseg-test",
        f"SlurmctldHost={host}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"SlurmctldPort={controller_port}",
        f"SlurmdPort={node_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        # Our own munged, not the system one (which may not run, or have another key).
        # cred_expire: a requeued job's old credential stays revoked this long and the job may
        # not start before (slurmctld gives it BeginTime = requeue + cred_expire + 1). Forcing an
        # earlier start ("StartTime=now") got "Job credential revoked" and a killed job; the
        # default of 120 s would make every requeue test wait two minutes.
        f"AuthInfo=socket={root}/run/munge.socket,cred_expire={CRED_EXPIRE_S}",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/run/slurmctld.pid",
        f"SlurmdPidFile={root}/run/slurmd.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.log",
        # No cgroups in containers: track processes by parent id, bind no tasks.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        # Pending jobs (a requeued one once its BeginTime passes) are looked at every second,
        # not every 30-60 s: the requeue tests wait for that.
        "SchedulerParameters=bf_interval=1,sched_interval=1",
        "SelectTypeParameters=CR_CPU",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",
        "GresTypes=gpu",
        # Keep finished jobs visible to `scontrol show job` for the tests (no accounting here).
        "MinJobAge=600",
        "KillWait=10",
        f"NodeName={host} CPUs=64 RealMemory=64000 Gres=gpu:{len(FAKE_GPU_FILES)} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(root, "gres.conf"), "w") as f:
        for device in FAKE_GPU_FILES:
            f.write(f"NodeName={host} Name=gpu File={device}\n")
    return conf


def parse_job(text):
    """`scontrol show job -o` output -> {key: value} (values have no spaces in -o form)."""
    fields = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


class SlurmCluster:
    """A running test cluster: `env` (with SLURM_CONF) runs the SLURM commands against it."""

    def __init__(self, root):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.conf = None
        self.env = None
        self.processes = []
        self.startup_seconds = None

    def start(self):
        start = time.monotonic()
        for sub in ("munge", "run", "state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        # munged refuses a socket folder that others cannot traverse, and a key others can read.
        os.chmod(self.root, 0o755)
        os.chmod(os.path.join(self.root, "run"), 0o755)
        os.chmod(os.path.join(self.root, "munge"), 0o700)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        os.chmod(key, 0o600)
        self.conf = write_config(self.root, self.host)
        self.env = dict(os.environ, SLURM_CONF=self.conf)
        for key_name in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if key_name != "SLURM_CONF":
                del self.env[key_name]

        self._spawn("munged", ["munged", "--foreground", f"--socket={self.root}/run/munge.socket",
                               f"--key-file={key}", f"--pid-file={self.root}/run/munged.pid",
                               f"--log-file={self.root}/log/munged.log",
                               f"--seed-file={self.root}/munge/munged.seed"])
        self._wait_for(lambda: os.path.exists(f"{self.root}/run/munge.socket"), "munged socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", self.conf])
        self._spawn("slurmd", ["slurmd", "-D", "-f", self.conf])
        self._wait_for(lambda: self.node_state() == "idle", "the node to be idle in sinfo")
        self.startup_seconds = time.monotonic() - start

    def _spawn(self, name, command):
        log = open(os.path.join(self.root, "log", f"{name}.stdout"), "w")
        self.processes.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                      env=self.env, start_new_session=True)))

    def _wait_for(self, condition, what):
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
            if condition():
                return
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {START_TIMEOUT_S}s waiting for {what}:\n{self.logs()}")

    def logs(self, tail=15):
        out = []
        for name in sorted(os.listdir(os.path.join(self.root, "log"))):
            with open(os.path.join(self.root, "log", name), errors="replace") as f:
                lines = f.read().splitlines()[-tail:]
            out.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(out)

    def run(self, *command, check=True, timeout=60, **kwargs):
        """Run a SLURM client command (sbatch, scontrol, ...) against this cluster."""
        proc = subprocess.run(command, env=kwargs.pop("env", self.env), capture_output=True,
                              text=True, timeout=timeout, **kwargs)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({proc.returncode}):\n"
                               f"{proc.stdout}{proc.stderr}")
        return proc

    def node_state(self):
        proc = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
        return proc.stdout.strip() if proc.returncode == 0 else None

    def submit(self, script, *args, options=(), cwd=REPO, env=None):
        """sbatch --parsable OPTIONS SCRIPT ARGS -> job id (a string, "123" or "123_4")."""
        proc = self.run("sbatch", "--parsable", *options, script, *args, cwd=cwd,
                        env=dict(self.env, **(env or {})))
        return proc.stdout.strip().split(";")[0]

    def wait_requeued_start(self, job_id, timeout=120):
        """Wait until a requeued job runs again. slurmctld holds it until its revoked credential
        expires (CRED_EXPIRE_S); it is never forced to start earlier, which fails it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.job(job_id).get("JobState") not in ("PENDING", "REQUEUED", "REQUEUE_HOLD", None):
                return
            time.sleep(0.5)
        raise TimeoutError(f"requeued job {job_id} did not start within {timeout}s: {self.job(job_id)}")

    def job(self, job_id):
        """The fields of `scontrol show job -o JOB` (the first record for an array)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=10)
        return parse_job(proc.stdout.splitlines()[0]) if proc.returncode == 0 and proc.stdout else {}

    def wait(self, job_id, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"), timeout=300):
        """Poll until every record of the job is in one of `states`; returns their fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False, timeout=10)
            records = [parse_job(line) for line in proc.stdout.splitlines() if line.strip()]
            if records and all(r.get("JobState") in states for r in records):
                return records
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: "
                           f"{self.job(job_id).get('JobState')}\n{self.logs()}")

    def stop(self):
        # Only our own cluster: before start() set self.env, `run` would use the caller's
        # environment, whose SLURM_CONF may point at a real site cluster.
        if self.env is not None and self.processes:
            self.run("scancel", "--full", "--user", str(os.getuid()), check=False, timeout=10)
        for name, proc in reversed(self.processes):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.processes = []


def start_cluster():
    """Install if needed and allowed, then start a cluster; returns (cluster, skip_reason)."""
    missing = missing_binaries()
    if missing and os.environ.get("SEMISEG_SLURM_INSTALL", "1") != "0":
        setup = subprocess.run(["bash", os.path.join(REPO, ".ci", "slurm_setup.sh")],
                               capture_output=True, text=True, timeout=900)
        missing = missing_binaries()
        if missing:
            return None, (f"SLURM binaries missing ({', '.join(missing)}) and .ci/slurm_setup.sh "
                          f"could not install them: {(setup.stdout + setup.stderr)[-500:]}")
    elif missing:
        return None, f"SLURM binaries missing ({', '.join(missing)}); SEMISEG_SLURM_INSTALL=0"
    for attempt in range(START_ATTEMPTS):
        cluster = SlurmCluster(tempfile.mkdtemp(prefix="semiseg-slurm-"))
        try:
            cluster.start()
            return cluster, None
        except RuntimeError as err:
            cluster.stop()
            shutil.rmtree(cluster.root, ignore_errors=True)
            # Another process may grab a port between our probe and the daemon's bind.
            if "Address already in use" not in str(err) or attempt == START_ATTEMPTS - 1:
                raise


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster, skip_reason = start_cluster()
    if cluster is None:
        pytest.skip(skip_reason)
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


if __name__ == "__main__":
    import signal
    cluster, reason = start_cluster()
    if cluster is None:
        raise SystemExit(reason)
    print(f"SLURM up in {cluster.startup_seconds:.1f}s: export SLURM_CONF={cluster.conf}",
          flush=True)
    def interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
