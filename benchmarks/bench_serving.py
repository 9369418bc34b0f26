"""Serving latency and throughput: `make serve` (MLflow's scoring app behind the strict gate)
against plain `mlflow models serve` on the same model, both measured in this run.

Usage: python benchmarks/bench_serving.py [--model URI] [--single 300] [--batches 20]
                                          [--seconds 6] [--clients 1,8,32] [--heavy 4]

Each server runs in its own process group on 127.0.0.1 and this process is the client: one-image
requests one after another (p50 and p99 latency), then 1,000-image requests (images per second);
then 1, 8 and 32 concurrent clients each sending 100-image requests for --seconds (p50 and p99
latency, throughput, and the 503s of a full queue); then --heavy clients sending the largest
body `make serve` accepts (4,400 images, 15.8 MB) while /ping is asked every 50 ms (its p50 and
worst latency). The load is bounded in count and in time (--budget seconds per server); both
servers are stopped by process group at the end. Run it after `make train` (the champion serves
the real test images). The clients share the machine with the servers: on 2 cores, 32 client
threads take CPU from the server too.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.core.split import load_split  # noqa: E402
from pipeline.support import config, store  # noqa: E402

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def start(command: list[str], env: dict[str, str], timeout: float = 120.0
          ) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([part.replace("{port}", str(port)) for part in command],
                               cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"bench_serving: {command[:4]} exited {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                if response.status == 200:
                    return process, url
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    stop(process)
    raise SystemExit(f"bench_serving: no answer on {url}/ping after {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue


def measure(url: str, X: np.ndarray, single: int, batches: int, budget: float) -> dict[str, float]:
    ones = [json.dumps({"inputs": X[i:i + 1].tolist()}).encode() for i in range(single)]
    thousand = [json.dumps({"inputs": X[i * 1000:(i + 1) * 1000].tolist()}).encode()
                for i in range(len(X) // 1000)]
    post(f"{url}/invocations", ones[0])  # warm-up
    deadline = time.monotonic() + budget
    latencies = []
    for body in ones:
        started = time.perf_counter()
        status, answer = post(f"{url}/invocations", body)
        latencies.append(time.perf_counter() - started)
        assert status == 200, answer[:200]
        if time.monotonic() > deadline:
            break
    images, seconds = 0, 0.0
    for i in range(batches):
        started = time.perf_counter()
        status, answer = post(f"{url}/invocations", thousand[i % len(thousand)])
        seconds += time.perf_counter() - started
        assert status == 200, answer[:200]
        images += 1000
        if time.monotonic() > deadline:
            break
    ms = np.array(latencies) * 1000
    return {"requests": len(latencies), "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "images": images,
            "images_per_s": images / seconds}


def _post_keep_alive(connection: http.client.HTTPConnection, body: bytes) -> int:
    connection.request("POST", "/invocations", body=body,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    return response.status


def concurrent(url: str, X: np.ndarray, clients: int, seconds: float,
               per_request: int = 100) -> dict[str, float]:
    """`clients` threads sending `per_request`-image requests for `seconds`."""
    bodies = [json.dumps({"inputs": X[i:i + per_request].tolist()}).encode()
              for i in range(0, min(len(X), 20 * per_request), per_request)]
    address = url.removeprefix("http://")
    deadline = time.monotonic() + seconds

    def client(index: int) -> tuple[list[float], int, int]:
        latencies, answered, busy = [], 0, 0
        connection = http.client.HTTPConnection(address, timeout=120)
        try:
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status = _post_keep_alive(connection, bodies[(index + answered) % len(bodies)])
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                    answered += 1
                elif status == 503:
                    busy += 1
                    time.sleep(0.05)
                else:
                    raise SystemExit(f"bench_serving: HTTP {status} under load")
        finally:
            connection.close()
        return latencies, answered, busy

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    ms = np.array([x for r in results for x in r[0]]) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)) if len(ms) else float("nan"),
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else float("nan"),
            "images_per_s": sum(r[1] for r in results) * per_request / wall,
            "busy": sum(r[2] for r in results)}


def ping_under_load(url: str, X: np.ndarray, clients: int, seconds: float,
                    images: int = 4400) -> dict[str, float]:
    """/ping latency while `clients` send `images`-image requests (15.8 MB) back to back."""
    rows = np.resize(X, (images, X.shape[1]))
    body = json.dumps({"inputs": rows.tolist()}).encode()
    address = url.removeprefix("http://")
    deadline = time.monotonic() + seconds
    done = threading.Event()
    pings: list[float] = []

    def ping() -> None:
        while not done.is_set():
            started = time.perf_counter()
            with urllib.request.urlopen(f"{url}/ping", timeout=120) as response:
                response.read()
            pings.append(time.perf_counter() - started)
            time.sleep(0.05)

    def client(_: int) -> tuple[int, int]:
        answered = busy = 0
        connection = http.client.HTTPConnection(address, timeout=300)
        try:
            while time.monotonic() < deadline:
                status = _post_keep_alive(connection, body)
                answered += status == 200
                busy += status == 503
                if status == 503:
                    time.sleep(0.2)
        finally:
            connection.close()
        return answered, busy

    pinger = threading.Thread(target=ping)
    pinger.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(client, range(clients)))
    finally:
        done.set()
        pinger.join()
    ms = np.array(pings) * 1000
    return {"ping_p50_ms": float(np.percentile(ms, 50)), "ping_max_ms": float(ms.max()),
            "answered": sum(r[0] for r in results), "busy": sum(r[1] for r in results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model URI (default: the champion)")
    parser.add_argument("--single", type=int, default=300, help="one-image requests")
    parser.add_argument("--batches", type=int, default=20, help="1,000-image requests")
    parser.add_argument("--budget", type=float, default=120.0, help="seconds of load per server")
    parser.add_argument("--seconds", type=float, default=6.0,
                        help="seconds of each concurrent load")
    parser.add_argument("--clients", default="1,8,32", help="concurrent client counts")
    parser.add_argument("--heavy", type=int, default=4,
                        help="clients sending the largest body while /ping is timed")
    args = parser.parse_args()
    levels = [int(n) for n in args.clients.split(",")]
    cfg = config.load(ROOT / config.PARAMS_FILE)
    model = args.model or store.model_uri(cfg.mlflow)
    X, _ = load_split(ROOT / cfg.data.split_dir, "test")
    X = np.resize(X, (max(len(X), 10_000), X.shape[1]))  # a small (synthetic) split, repeated
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # uvicorn
           store.TRACKING_URI_ENV: store.tracking_uri(cfg.mlflow),
           "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    servers = {
        "make serve (gate + MLflow app)": [str(BIN / "python"), "-m", "pipeline.commands.serve",
                                           "--model", model, "--port", "{port}"],
        "mlflow models serve": [str(BIN / "mlflow"), "models", "serve", "-m", model,
                                "--env-manager", "local", "-h", "127.0.0.1", "-p", "{port}"],
    }
    results = {}
    for name, command in servers.items():
        process, url = start(command, env)
        try:
            results[name] = measure(url, X, args.single, args.batches, args.budget)
            for clients in levels:
                results[name][clients] = concurrent(url, X, clients, args.seconds)
            results[name]["ping"] = ping_under_load(url, X, args.heavy, 2 * args.seconds)
        finally:
            stop(process)
    print(f"model {model}, {os.cpu_count()} CPUs, client and server on 127.0.0.1")
    print(f"{'server':<32} {'1-image p50':>12} {'p99':>9} {'1,000-image req.':>17}")
    for name, r in results.items():
        print(f"{name:<32} {r['p50_ms']:>9.1f} ms {r['p99_ms']:>6.1f} ms "
              f"{r['images_per_s']:>10,.0f} img/s   ({r['requests']} + {r['images'] // 1000} "
              "requests)")
    print(f"\n{'server':<32} {'clients':>7} {'p50':>9} {'p99':>9} {'images/s':>9} {'503s':>5}"
          "   (100-image requests)")
    for name, r in results.items():
        for clients in levels:
            c = r[clients]
            print(f"{name:<32} {clients:>7} {c['p50_ms']:>6.0f} ms {c['p99_ms']:>6.0f} ms "
                  f"{c['images_per_s']:>9,.0f} {c['busy']:>5}")
    print(f"\n/ping while {args.heavy} clients send 4,400-image (15.8 MB) requests for "
          f"{2 * args.seconds:.0f} s")
    for name, r in results.items():
        ping = r["ping"]
        print(f"{name:<32} /ping p50 {ping['ping_p50_ms']:.0f} ms, worst "
              f"{ping['ping_max_ms']:.0f} ms; {ping['answered']} answered, {ping['busy']} 503s")
    gate, plain = results[next(iter(servers))], results["mlflow models serve"]
    print(f"ratio make serve / mlflow models serve: p50 {gate['p50_ms'] / plain['p50_ms']:.2f}, "
          f"throughput {gate['images_per_s'] / plain['images_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
