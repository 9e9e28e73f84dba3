"""Serving under load: concurrent single-image requests vs batch-32 requests vs in-process calls.

An exported MobileNet(alpha=0.25) 224² classifier (the shared ImageNet weights, a 2-class head) is
served by ``scripts/serve.py`` in its own process, on loopback only; this process is the client.
Request bodies are the shared ants/bees photos, base64 in TF Serving's JSON, built before timing;
each client thread keeps one HTTP/1.1 connection. For each server setting (batching on, the
default; batching off):

- ``batch-32``: requests of 32 images each, from 1 and from 2 client threads;
- ``single``: ``--clients`` threads × ``--requests`` one-image requests;
- ``single + swap``: the same, while a new version folder appears (renamed in whole, as
  ``tlkeras.export`` writes one): the server loads and warms it in the background and swaps.

Reported: images/s, p50/p99 request latency, failed requests, and the ratios the targets are about.
Bounded: a fixed number of requests, a 30 s timeout on each, at most 120 s a run (requests not sent
by then count as failed), the server stopped with SIGTERM at the
end (killed if it has not left 30 s later). Not a test: it asserts nothing.

    python benchmarks/serving.py [--clients=16] [--requests=25] [--before=COMMIT] [--output=BENCHMARKS.md]

``--before=COMMIT`` adds the server as it was at that commit (run from a temporary git worktree).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import REPO, SHARED, machine, write_section

PHOTOS = SHARED / "data" / "hymenoptera" / "train"
WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
SIZE = 224
REQUEST_TIMEOUT = 30
# A run stops sending after this long: a server that stalls ends the run, counted as failures.
RUN_SECONDS = 120


def _photos() -> list[bytes]:
    files = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise FileNotFoundError(f"expected the shared photos under {PHOTOS}, found none")
    return [p.read_bytes() for p in files]


def _body(images: list[bytes]) -> bytes:
    return json.dumps(
        {"instances": [{"b64": base64.b64encode(b).decode("ascii")} for b in images]}
    ).encode()


def export_model(base_dir: Path) -> Path:
    """Version 1 of ``bench`` under ``base_dir``; returns its folder."""
    import tlkeras

    model = tlkeras.build_model(
        "MobileNet",
        2,
        weights=str(WEIGHTS) if WEIGHTS.is_file() else None,
        input_shape=(SIZE, SIZE, 3),
        backbone_kwargs={"alpha": 0.25},
    )
    result = tlkeras.export(
        model, "bench", base_dir=base_dir, class_names=["ants", "bees"], verify=False
    )
    return Path(result.path)


class ServerProcess:
    """``scripts/serve.py`` on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model_base_path: Path, flags: list[str], repo: Path = REPO) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(repo / "scripts" / "serve.py"),
                f"--model_base_path={model_base_path}",
                "--port=0",
                *flags,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Another checkout's tlkeras (``--before``) comes first on the path.
            env={**os.environ, "PYTHONPATH": str(repo)},
        )
        line = self.proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:([0-9]+)/", line)
        if not m:
            self.stop()
            raise RuntimeError(f"serve.py did not start: {line}{self.proc.stderr.read()}")
        self.port = int(m[1])

    def get(self, path: str) -> Any:
        """The JSON answer, or ``None`` when the server does not answer in time."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=REQUEST_TIMEOUT)
        try:
            conn.request("GET", path)
            return json.loads(conn.getresponse().read())
        except (OSError, http.client.HTTPException, ValueError):
            return None
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def load(
    port: int, bodies: list[bytes], clients: int, requests: int, during=None
) -> dict[str, Any]:
    """``clients`` threads each send ``requests`` bodies (round robin) on one keep-alive
    connection; ``during()`` runs once a third of the requests are answered."""
    latencies: list[float] = []
    failures: list[str] = []
    stop_at = time.perf_counter() + RUN_SECONDS
    lock = threading.Lock()
    answered = [0]
    third = clients * requests // 3
    fired = threading.Event()

    def client(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
        try:
            for j in range(requests):
                if time.perf_counter() > stop_at:
                    break
                body = bodies[(i * requests + j) % len(bodies)]
                t0 = time.perf_counter()
                try:
                    conn.request("POST", "/v1/models/bench:predict", body=body)
                    response = conn.getresponse()
                    payload = response.read()
                    ok = response.status == 200
                except (OSError, http.client.HTTPException) as e:
                    ok, payload = False, str(e).encode()
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT)
                dt = time.perf_counter() - t0
                with lock:
                    latencies.append(dt)
                    answered[0] += 1
                    if not ok:
                        failures.append(payload[:200].decode("utf-8", "replace"))
                    go = during is not None and answered[0] >= third and not fired.is_set()
                    if go:
                        fired.set()
                if go:
                    during()
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    unsent = clients * requests - len(latencies)
    if unsent:
        failures.append(f"{unsent} requests not sent: the run stopped after {RUN_SECONDS} s")
    return {
        "requests": len(latencies),
        "failed": len(failures) - (1 if unsent else 0) + unsent,
        "failures": failures[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
        "max_ms": round(1000 * latencies[-1], 1),
    }


def in_process(version_dir: Path, photos: list[bytes], batches: int) -> dict[str, float]:
    """The exported bytes signature called directly: images/s at batch 32 and batch 1."""
    import tlkeras

    model = tlkeras.load_exported(version_dir)
    model.predict_bytes(photos[:32])
    out = {}
    for batch in (32, 1):
        n = batches * 32 if batch == 32 else 64
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            model.predict_bytes([photos[(i + k) % len(photos)] for k in range(batch)])
        out[f"batch {batch}"] = round(n / (time.perf_counter() - t0), 1)
    return out


def run(clients: int, requests: int, batches: int, before: str | None = None) -> dict[str, Any]:
    photos = _photos()
    singles = [_body([p]) for p in photos]
    batch32 = [_body([photos[(i * 32 + k) % len(photos)] for k in range(32)]) for i in range(8)]
    results: dict[str, Any] = {"clients": clients, "requests": requests, "batches": batches}
    with tempfile.TemporaryDirectory(prefix="tlkeras-serving-bench-") as tmp:
        base = Path(tmp) / "models"
        version1 = export_model(base)
        model_dir = version1.parent
        results["in_process"] = in_process(version1, photos, batches)
        print("in-process SavedModel:", results["in_process"], flush=True)
        poll = "--file_system_poll_wait_seconds=0.5"
        settings = [
            ("batching", [poll], REPO),
            ("no batching", [poll, "--noenable_batching"], REPO),
        ]
        if before:  # the server as it was at commit ``before``, from a temporary worktree
            old = Path(tmp) / "before"
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "add", "--detach", str(old), before],
                check=True,
                capture_output=True,
            )
            settings.append((f"before ({before})", [], old))
        results["settings"] = [name for name, _, _ in settings]
        for setting, flags, repo in settings:
            for v in model_dir.iterdir():  # each setting starts from version 1 alone
                if v.name != "1":
                    shutil.rmtree(v)
            server = ServerProcess(model_dir, flags, repo)
            try:
                load(server.port, singles[:4], 2, 4)  # warm: connections, first batches
                row: dict[str, Any] = {}
                for n in (1, 2):
                    r = load(server.port, batch32, n, max(1, batches // n))
                    r["images_per_s"] = round(r["requests_per_s"] * 32, 1)
                    row[f"batch-32 x{n}"] = r
                r = load(server.port, singles, clients, requests)
                r["images_per_s"] = r["requests_per_s"]
                row["single"] = r

                staged = Path(tmp) / "staged"

                def swap(staged: Path = staged) -> None:
                    # A complete version folder appears at once, as tlkeras.export writes one.
                    staged.rename(model_dir / "2")

                shutil.copytree(version1, staged)
                r = load(server.port, singles, clients, requests, during=swap)
                r["images_per_s"] = r["requests_per_s"]
                deadline = time.monotonic() + 60
                status: list = []
                while time.monotonic() < deadline:
                    answer = server.get("/v1/models/bench")
                    if answer is None:
                        status = [{"version": "?", "state": "no answer to GET status"}]
                        break
                    status = answer["model_version_status"]
                    if any(s["version"] == "2" and s["state"] == "AVAILABLE" for s in status):
                        break
                    time.sleep(0.2)
                r["versions_after"] = {s["version"]: s["state"] for s in status}
                row["single + swap"] = r
                results[setting] = row
                print(setting, json.dumps(row, indent=1), flush=True)
            finally:
                server.stop()
        if before:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(old)], check=True
            )
    return results


def failed(results: dict[str, Any], settings: list[str]) -> int:
    return sum(r["failed"] for s in settings for r in results[s].values())


def format_table(results: dict[str, Any]) -> str:
    lines = [
        "| server | requests | images/s | p50 ms | p99 ms | max ms | failed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for setting in results["settings"]:
        for name, r in results[setting].items():
            lines.append(
                f"| {setting} | {name} | {r['images_per_s']:.1f} | {r['p50_ms']:.0f} | "
                f"{r['p99_ms']:.0f} | {r['max_ms']:.0f} | {r['failed']} |"
            )
    ip = results["in_process"]
    lines.append(
        f"| in-process SavedModel | batch 32 / batch 1 | {ip['batch 32']:.1f} / {ip['batch 1']:.1f} "
        "| | | | |"
    )
    b = results["batching"]
    best_batch = max(b["batch-32 x1"]["images_per_s"], b["batch-32 x2"]["images_per_s"])
    single, swap = b["single"], b["single + swap"]
    ratio = single["images_per_s"] / best_batch
    swap_ratio = swap["p99_ms"] / swap["p50_ms"]
    off = results["no batching"]["single"]["images_per_s"]
    lines += [
        "",
        f"{results['clients']} client threads × {results['requests']} one-image requests; "
        "batch-32: 1 and 2 client threads; photos: shared ants/bees JPEGs; MobileNet(alpha=0.25) "
        f"{SIZE}², loopback.",
        "",
        f"- Single-image throughput vs the best batch-32 throughput (batching on): "
        f"**{ratio:.2f}×** (target ≥ 0.8: {'met' if ratio >= 0.8 else 'missed'}); "
        f"batching on vs off for single images: {single['images_per_s'] / off:.2f}×.",
        f"- p99/p50 across the version swap: **{swap_ratio:.2f}** (target ≤ 3: "
        f"{'met' if swap_ratio <= 3 else 'missed'}); versions after: {swap['versions_after']}.",
        f"- Failed requests, all runs: **{failed(results, ['batching', 'no batching'])}** "
        "(target 0).",
    ]
    if len(results["settings"]) > 2:
        name = results["settings"][2]
        old = results[name]["single"]
        lines.append(
            f"- Against the server {name}: single-image throughput {single['images_per_s'] / old['images_per_s']:.2f}×, "
            f"p99 {old['p99_ms']:.0f} → {single['p99_ms']:.0f} ms; across a swap p99 "
            f"{results[name]['single + swap']['p99_ms']:.0f} → {swap['p99_ms']:.0f} ms; its failed requests: "
            f"{failed(results, [name])}."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=25, help="per client thread")
    parser.add_argument("--batches", type=int, default=16, help="batch-32 requests per run")
    parser.add_argument(
        "--before", default=None, help="also run the server of this git commit (a worktree)"
    )
    parser.add_argument(
        "--output", default=str(REPO / "BENCHMARKS.md"), help="'' prints only (no file written)"
    )
    args = parser.parse_args()
    results = run(args.clients, args.requests, args.batches, args.before)
    info = machine()
    text = (
        "## Serving under load (`benchmarks/serving.py`)\n\n"
        + format_table(results)
        + f"\n\nMachine: {info['cpu']}, {info['cores']} cores, load average before "
        f"{info.get('load_average')}. Re-measure: `cd benchmarks && python serving.py`.\n"
    )
    print(text)
    if args.output:
        write_section(args.output, "serving_load", text)


if __name__ == "__main__":
    main()
