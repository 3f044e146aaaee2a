#!/usr/bin/env python3
"""Flower's federated round time, for comparison with fedpriv's `bench_round`
(examples/bench_round.rs). Prints one JSON line.

What runs: one Flower server process and N site (client) processes on loopback, all
started by this script (it re-runs itself with `--role server` / `--role client`). The
model is D float32 values split like bench_round's MLP (10 features, H hidden units:
W1 10xH, b1 H, W2 Hx1, b2 1, so D = 12H + 1, H chosen as in bench_round's `mlp_for`).
Each round the server sends the model to every site; every site, without training, sends
back the model plus a fixed small pseudo-random delta (uniform in +-1e-4, like
bench_round's stand-in update), i.e. D float32 values. FedAvg averages them into the new
model. No federated evaluation (fraction_evaluate = 0), no centralised evaluation.

API: Flower's legacy gRPC stack, `flwr.server.start_server` and (underneath
`flwr.client.start_client`) `flwr.compat.client.app.start_client_internal`. They are
deprecated since flwr 1.13 but still shipped and working in the installed flwr, and they
give what the comparison needs: separate OS processes talking real gRPC (bidirectional
streaming, one protobuf message per model / update) over TLS, with per-round control on
the server (a `Server` subclass times each round). `start_client_internal` is what
`start_client` calls; it is used directly only to pass a `ClientApp` with `mods`
(`start_client` has no `mods` argument), which `--dp local` needs for `LocalDpMod`. The
newer SuperLink/SuperNode stack (`flower-superlink`, `flower-supernode`, `flwr run` with a
Flower App Bundle) has another data path (request/response gRPC through the SuperLink's
state and object store, the ServerApp and ClientApps in further subprocesses) and is not
what is measured here.

TLS: always on. A throw-away ECDSA P-256 CA and a server certificate for 127.0.0.1 and
localhost (as fedpriv's PKI uses P-256) are made with the `cryptography` package in a
temporary directory; the server gets (CA, cert, key), the clients the CA as root
certificates. Flower's legacy gRPC server is created with `require_client_auth=False` and
the legacy client has no client-certificate option, so TLS here is server-authenticated
only: there is NO client certificate (fedpriv's bench uses mutual TLS, TLS 1.3 only).

DP modes (clip C = 1.0, noise multiplier z = 1.0):
  --dp off      plain FedAvg.
  --dp local    `flwr.client.mod.LocalDpMod` on every site. The mod clips the update
                (returned minus received parameters) to L2 norm `clipping_norm`, then adds
                N(0, sd^2) to every returned value with
                    sd = sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon
                (flwr/supercore/differential_privacy.py, add_localdp_gaussian_noise_to_params;
                the classic Gaussian-mechanism calibration). We set clipping_norm = 1.0,
                sensitivity = 1.0 (= C), delta = 1e-5 (bench_round's delta) and
                epsilon = sqrt(2 ln(1.25e5)) = 4.8448..., so sd = 1.0 = z * C, the noise
                each fedpriv bench site adds. (That epsilon is outside the classic bound's
                validity range, eps < 1; it is chosen only to match the noise scale, no
                privacy claim is made from it.)
  --dp central  `DifferentialPrivacyServerSideFixedClipping(FedAvg, noise_multiplier=1.0,
                clipping_norm=1.0, num_sampled_clients=N)`: the server clips each site's
                update to C, averages, and adds N(0, (z*C/N)^2) once to the D averaged
                values (sd z*C on the sum). Sites add no noise. Same sd on the sum as in
                fedpriv's per-site noise only up to sqrt(N) (local: the sum carries sd
                z*C*sqrt(N)), and D Gaussian draws on the server instead of N*D on the
                sites; a different trust model, reported for reference.
Flower draws noise with `np.random.normal` (float64 then cast to float32, not a CSPRNG);
fedpriv draws from its secure generator.

Round time: on the server, from the start of `Server.fit_round` (before
`strategy.configure_fit`, after all N sites are connected: each round first waits, untimed,
until N clients are registered) to the end of `strategy.aggregate_fit` (the new model as
Flower `Parameters`, serialised, in memory). Process start-up, imports, TLS handshakes and
connection are not in it. With `--checkpoint`, the new model's bytes are also written to a
file and fsync'ed (file and directory) inside the round, as a rough stand-in for
fedpriv's durable checkpoint (which also seals with AES-256-GCM and hashes with SHA-256,
not done here).

CPU and memory: server CPU seconds (user+system, all threads) between the first round's
start and the last round's end, divided by rounds; sites' CPU from just before each client
connects until it is told to disconnect, summed over sites, divided by rounds (bench_round
counts whole processes). Peak RSS: `ru_maxrss` of the server process and the largest of the
sites', at their end.

Never hangs: an overall `--timeout` (default 900 s) in the parent, a deadline and a
parent-death watchdog in every child, a gRPC round timeout on the server; all children are
terminated (then killed) on every exit path.

Usage (venv: see README.md):
  /work/venv-flwr/bin/python tools/flower_bench/flower_round.py \
      --sites 4 --params 1000000 --rounds 5 --dp local
"""
import argparse
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import version as pkg_version

CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
FEATURES = 10
# LocalDpMod: sd = sensitivity * sqrt(2 ln(1.25/delta)) / epsilon; pick epsilon for sd = z*C.
LOCAL_SENSITIVITY = CLIP_NORM
LOCAL_EPSILON = LOCAL_SENSITIVITY * math.sqrt(2.0 * math.log(1.25 / DELTA)) / (
    NOISE_MULTIPLIER * CLIP_NORM
)
GRPC_MAX_LIMIT = 2**31 - 1  # gRPC message lengths are int32
GRPC_MIN_LIMIT = 536_870_912  # Flower's default (512 MiB)


def mlp_for(params):
    """bench_round's `mlp_for`: hidden width whose MLP size 12H+1 is closest to params."""
    hidden = max(1.0, round((max(params, 4) - 1) / (FEATURES + 2)))
    return FEATURES, int(hidden)


def shapes_for(params):
    f, h = mlp_for(params)
    return [(f, h), (h,), (h, 1), (1,)]


def num_values(shapes):
    return sum(math.prod(s) for s in shapes)


def grpc_limit(d):
    """Message limit: the model/update (4 bytes a value) plus room for framing."""
    need = 4 * d + 16 * 1024 * 1024
    if need > GRPC_MAX_LIMIT:
        raise SystemExit(
            f"flower_round: a model of {d} float32 values ({4 * d} bytes) does not fit in one "
            f"gRPC message (limit {GRPC_MAX_LIMIT} bytes); Flower's legacy gRPC sends the whole "
            "model as one message"
        )
    return max(GRPC_MIN_LIMIT, min(GRPC_MAX_LIMIT, 2 * need))


def load_average():
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def cpu_seconds():
    t = os.times()
    return t.user + t.system


def peak_rss_kib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def stats(v):
    s = sorted(v)
    r = lambda x: round(x, 4)
    if not s:
        return {"median": None, "min": None, "max": None}
    n = len(s)
    med = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    return {"median": r(med), "min": r(s[0]), "max": r(s[-1])}


def quiet_flower_env(env):
    env = dict(env)
    env["FLWR_TELEMETRY_ENABLED"] = "0"  # no network calls from Flower
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


# ---------------------------------------------------------------------------------------
# Children: a watchdog so that no child outlives its deadline or its parent.


def start_watchdog(deadline, parent_pid):
    def watch():
        while True:
            if time.time() > deadline:
                sys.stderr.write("flower_round child: deadline passed, exiting\n")
                sys.stderr.flush()
                os._exit(3)
            if os.getppid() != parent_pid:
                os._exit(4)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True).start()


def server_main(a):
    import numpy as np
    from flwr.common import ndarrays_to_parameters
    from flwr.server import Server, ServerConfig, SimpleClientManager, start_server
    from flwr.server.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

    shapes = shapes_for(a.params)
    d = num_values(shapes)
    rng = np.random.default_rng(0)
    init = [(rng.standard_normal(s) * 0.01).astype(np.float32) for s in shapes]

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=a.sites,
        min_evaluate_clients=0,
        min_available_clients=a.sites,
        initial_parameters=ndarrays_to_parameters(init),
    )
    del init
    if a.dp == "central":
        strategy = DifferentialPrivacyServerSideFixedClipping(
            strategy,
            noise_multiplier=NOISE_MULTIPLIER,
            clipping_norm=CLIP_NORM,
            num_sampled_clients=a.sites,
        )

    ckpt = os.path.join(a.dir, "checkpoint.bin") if a.checkpoint else None
    state = {"rounds_s": [], "cpu0": None, "cpu1": None}

    class TimedServer(Server):
        def fit_round(self, server_round, timeout):
            if not self.client_manager().wait_for(a.sites, timeout=int(a.connect_timeout)):
                raise RuntimeError(f"{a.sites} sites did not connect in {a.connect_timeout} s")
            if state["cpu0"] is None:
                state["cpu0"] = cpu_seconds()
            t0 = time.perf_counter()
            res = super().fit_round(server_round, timeout)
            if res is None:
                raise RuntimeError(f"round {server_round}: no clients selected")
            params, _, (results, failures) = res
            if failures or len(results) != a.sites or params is None:
                raise RuntimeError(
                    f"round {server_round}: {len(results)} results, {len(failures)} failures "
                    f"({failures[:1]!r}), new model {'missing' if params is None else 'present'}"
                )
            if ckpt is not None:
                tmp = ckpt + ".tmp"
                with open(tmp, "wb") as f:
                    for t in params.tensors:
                        f.write(t)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, ckpt)
                dfd = os.open(a.dir, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            state["rounds_s"].append(time.perf_counter() - t0)
            state["cpu1"] = cpu_seconds()
            return res

    with open(os.path.join(a.dir, "ca.pem"), "rb") as f:
        ca = f.read()
    with open(os.path.join(a.dir, "server.pem"), "rb") as f:
        cert = f.read()
    with open(os.path.join(a.dir, "server.key"), "rb") as f:
        key = f.read()

    server = TimedServer(client_manager=SimpleClientManager(), strategy=strategy)
    start_server(
        server_address=f"127.0.0.1:{a.port}",
        server=server,
        config=ServerConfig(num_rounds=a.rounds, round_timeout=a.round_timeout),
        grpc_max_message_length=grpc_limit(d),
        certificates=(ca, cert, key),
    )
    if len(state["rounds_s"]) != a.rounds:
        raise RuntimeError(f"{len(state['rounds_s'])} of {a.rounds} rounds completed")
    out = {
        "rounds_s": state["rounds_s"],
        "cpu_s": state["cpu1"] - state["cpu0"],
        "peak_rss_kib": peak_rss_kib(),
    }
    with open(os.path.join(a.dir, "server.json.tmp"), "w") as f:
        json.dump(out, f)
    os.replace(os.path.join(a.dir, "server.json.tmp"), os.path.join(a.dir, "server.json"))


def client_main(a):
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import LocalDpMod
    from flwr.compat.client.app import start_client_internal

    shapes = shapes_for(a.params)
    d = num_values(shapes)
    # The stand-in for a trained delta: fixed, uniform in +-1e-4 (as bench_round's sites).
    rng = np.random.default_rng(1000 + a.index)
    delta = [rng.uniform(-1e-4, 1e-4, s).astype(np.float32) for s in shapes]

    class BenchClient(NumPyClient):
        def get_parameters(self, config):
            raise RuntimeError("the server has initial parameters; get_parameters unexpected")

        def fit(self, parameters, config):
            if [p.shape for p in parameters] != shapes:
                raise RuntimeError(f"unexpected model shapes {[p.shape for p in parameters]}")
            # No training: the "new local model" is the received model plus the fixed delta.
            return [p + u for p, u in zip(parameters, delta)], 1, {}

        def evaluate(self, parameters, config):
            return 0.0, 1, {}

    def client_fn(context):
        return BenchClient().to_client()

    mods = []
    if a.dp == "local":
        mods.append(
            LocalDpMod(
                clipping_norm=CLIP_NORM,
                sensitivity=LOCAL_SENSITIVITY,
                epsilon=LOCAL_EPSILON,
                delta=DELTA,
            )
        )
    app = ClientApp(client_fn=client_fn, mods=mods)

    with open(os.path.join(a.dir, "ca.pem"), "rb") as f:
        ca = f.read()
    cpu0 = cpu_seconds()
    start_client_internal(
        server_address=f"127.0.0.1:{a.port}",
        node_config={},
        load_client_app_fn=lambda *_: app,
        grpc_max_message_length=grpc_limit(d),
        root_certificates=ca,
        insecure=False,
        transport="grpc-bidi",
        max_retries=20,
        max_wait_time=a.connect_timeout,
    )
    out = {"cpu_s": cpu_seconds() - cpu0, "peak_rss_kib": peak_rss_kib()}
    path = os.path.join(a.dir, f"client-{a.index}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(path + ".tmp", path)


# ---------------------------------------------------------------------------------------
# The parent.


def write_pki(d):
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=2)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "flower bench CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    with open(os.path.join(d, "ca.pem"), "wb") as f:
        f.write(ca_cert.public_bytes(pem))
    with open(os.path.join(d, "server.pem"), "wb") as f:
        f.write(cert.public_bytes(pem))
    with open(os.path.join(d, "server.key"), "wb") as f:
        f.write(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def stop_all(procs):
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except OSError:
                pass
    deadline = time.time() + 5
    for p in procs:
        while p.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
            p.wait()


def bench_main(a):
    if a.sites < 1 or a.rounds < 1 or a.params < 4:
        raise SystemExit("flower_round: --sites and --rounds must be >= 1, --params >= 4")
    shapes = shapes_for(a.params)
    d = num_values(shapes)
    grpc_limit(d)  # fail early when one message cannot carry the model
    flwr_version = pkg_version("flwr")
    deadline = time.time() + a.timeout
    tmp = tempfile.TemporaryDirectory(prefix="flower_round_")
    dir_ = a.keep_dir or tmp.name
    os.makedirs(dir_, exist_ok=True)
    write_pki(dir_)
    port = free_tcp_port()
    env = quiet_flower_env(os.environ)
    common = [
        "--dir", dir_, "--port", str(port), "--sites", str(a.sites), "--params", str(a.params),
        "--rounds", str(a.rounds), "--dp", a.dp, "--deadline", str(deadline),
        "--parent-pid", str(os.getpid()), "--connect-timeout", str(a.connect_timeout),
        "--round-timeout", str(a.round_timeout),
    ] + (["--checkpoint"] if a.checkpoint else [])
    me = [sys.executable, os.path.abspath(__file__)]
    procs = []
    logs = []

    def spawn(role, extra, log_name):
        log_path = os.path.join(dir_, log_name)
        logf = open(log_path, "wb")
        p = subprocess.Popen(
            me + ["--role", role] + common + extra,
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=env,
        )
        logf.close()
        procs.append(p)
        logs.append(log_path)
        return p

    def fail(msg, p=None):
        detail = ""
        if p is not None:
            detail = f"\n--- {logs[procs.index(p)]} (tail) ---\n" + tail(logs[procs.index(p)])
        raise SystemExit(f"flower_round: {msg}{detail}")

    def on_signal(signum, _frame):
        raise SystemExit(f"flower_round: signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        server = spawn("server", [], "server.log")
        # Wait until the server accepts TCP connections.
        while True:
            if server.poll() is not None:
                fail(f"the server exited ({server.returncode}) before listening", server)
            if time.time() > deadline:
                fail("timed out waiting for the server to listen", server)
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.2)
        clients = [spawn("client", ["--index", str(i)], f"client-{i}.log") for i in range(a.sites)]
        while server.poll() is None:
            if time.time() > deadline:
                fail(f"timed out after {a.timeout} s"
                     + ("" if a.keep_dir else " (rerun with --keep-dir DIR to keep the logs)"), server)
            for c in clients:
                # Sites exit 0 once told to disconnect, which can be before the server ends.
                if c.poll() not in (None, 0):
                    fail(f"a site exited ({c.returncode}) before the server finished", c)
            time.sleep(0.1)
        if server.returncode != 0:
            fail(f"the server exited with {server.returncode}", server)
        for c in clients:
            left = max(1.0, min(30.0, deadline - time.time()))
            try:
                c.wait(timeout=left)
            except subprocess.TimeoutExpired:
                fail("a site did not exit after the last round", c)
            if c.returncode != 0:
                fail(f"a site exited with {c.returncode}", c)
        with open(os.path.join(dir_, "server.json")) as f:
            srv = json.load(f)
        sites = []
        for i in range(a.sites):
            with open(os.path.join(dir_, f"client-{i}.json")) as f:
                sites.append(json.load(f))
    finally:
        stop_all(procs)
        for s, h in old.items():
            signal.signal(s, h)
        tmp.cleanup()

    f32_bytes = 4 * d
    per_round = lambda x: round(x / a.rounds, 3)
    noise_sd = {
        "off": None,
        "local": LOCAL_SENSITIVITY * math.sqrt(2 * math.log(1.25 / DELTA)) / LOCAL_EPSILON,
        "central": NOISE_MULTIPLIER * CLIP_NORM / a.sites,
    }[a.dp]
    line = {
        "bench": "flower_round",
        "flwr": flwr_version,
        "api": "legacy grpc-bidi (start_server / start_client_internal)",
        "sites": a.sites,
        "params": d,
        "model": f"mlp hidden={shapes[1][0]} features={FEATURES}",
        "rounds": a.rounds,
        "dp": a.dp,
        "noise_sd": None if noise_sd is None else round(noise_sd, 6),
        "noise_sd_applies_to": {"off": None, "local": "each site's update",
                                "central": "the server's average"}[a.dp],
        "tls": True,
        "mutual_tls": False,
        "checkpoint": a.checkpoint,
        "round_s": stats(srv["rounds_s"]),
        "rounds_s": [round(x, 4) for x in srv["rounds_s"]],
        "server_peak_rss_mib": round(srv["peak_rss_kib"] / 1024),
        "model_mib": round(f32_bytes / 2**20, 1),
        "peak_rss_in_model_copies": round(srv["peak_rss_kib"] * 1024 / f32_bytes, 2),
        "sites_peak_rss_mib": round(max(s["peak_rss_kib"] for s in sites) / 1024),
        "server_cpu_s_per_round": per_round(srv["cpu_s"]),
        "sites_cpu_s_per_round": per_round(sum(s["cpu_s"] for s in sites)),
        "bytes_per_round": 2 * a.sites * f32_bytes,
        "load_average_1m": load_average(),
        "cores": os.cpu_count(),
    }
    print(json.dumps(line), flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sites", type=int, default=4, help="number of site processes")
    p.add_argument("--params", type=int, default=1_000_000,
                   help="approximate number of float32 parameters (MLP sized as bench_round)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dp", choices=["off", "local", "central"], default="local")
    p.add_argument("--checkpoint", action="store_true",
                   help="write and fsync the new model inside each round")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    p.add_argument("--connect-timeout", type=float, default=120.0,
                   help="seconds for all sites to connect")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="Flower's per-round timeout (a site slower than this is a failure)")
    p.add_argument("--keep-dir", help="keep certificates, logs and results here")
    # Internal.
    p.add_argument("--role", choices=["bench", "server", "client"], default="bench",
                   help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.role == "bench":
        bench_main(a)
        return
    start_watchdog(a.deadline, a.parent_pid)
    try:
        (server_main if a.role == "server" else client_main)(a)
    except BaseException as e:  # noqa: BLE001 - report and leave at once, whatever it is
        import traceback

        traceback.print_exc()
        sys.stderr.write(f"flower_round {a.role}: {e!r}\n")
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # gRPC threads can keep an interpreter alive; the work is done and written.
    os._exit(0)


if __name__ == "__main__":
    main()
