#!/usr/bin/env python3
"""keyswap's side-by-side benchmark in Envoy (run it through `scripts/bench`).

One Envoy (`--concurrency 1`, pinned to one core) serves five listeners that
all proxy to the same fast local responder:

    plain      the floor: HTTP connection manager and router, nothing else
    noop_wasm  the wasm floor: a proxy-wasm filter that does nothing (bench/noop-filter)
    native     api_key_auth + credential_injector + header_mutation doing keyswap's job
    lua        the same job in a Lua filter
    keyswap    keyswap doing the job

The job: 1,000 clients; the key comes in `authorization: Bearer <key>`; the
client id is forwarded in `x-keyswap-client`; the key never reaches the
upstream; the upstream gets `authorization: Bearer <credential>`; four
headers (cookie, proxy-authorization, x-debug-token, x-internal-user) are
stripped. Every listener is checked to do that job (or, for the floors, to
proxy) before anything is measured.

The load generator (wrk) and the responder share the other core. The
listeners are alternated over many rounds (in a rotated order each round),
and for each listener the script reports the median and spread of Envoy's
CPU time per request (utime + stime from /proc/PID/stat, all threads),
requests per second, and wrk's p50/p99 latency; then keyswap's added CPU
over plain Envoy as a ratio of the native chain's.

Standard library only. Generated files go to `.run/bench/`.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / ".run" / "bench"

CLIENTS = 1000
LOAD_CLIENT = 500
UPSTREAM_CREDENTIAL = "bench-upstream-credential"
CLIENT_HEADER = "x-keyswap-client"
STRIPPED = ["cookie", "proxy-authorization", "x-debug-token", "x-internal-user"]
ADMIN_PORT = 19901
RESPONDER_PORT = 19000
LISTENERS = [
    ("plain", 19100),
    ("noop_wasm", 19101),
    ("native", 19102),
    ("lua", 19103),
    ("keyswap", 19104),
]
JOB_LISTENERS = {"native", "lua", "keyswap"}
# Extra keyswap listeners (`--variant NAME=WASM`): another build of the
# filter doing the same job in the same run, for before/after figures.
VARIANTS: dict[str, Path] = {}
# Variants placed on the listener only, with the route matched by
# `path_prefix` (`--variant-listener-only NAME=WASM`): how keyswap was
# deployed before its two stages, for before/after figures against a build
# that predates them.
LISTENER_ONLY: set[str] = set()


def key(i: int) -> str:
    return f"bench-key-{i:04d}"


def client_id(i: int) -> str:
    return f"client-{i:04d}"


def load_headers() -> list[tuple[str, str]]:
    """What every load request carries besides Host."""
    return [
        ("authorization", f"Bearer {key(LOAD_CLIENT)}"),
        ("cookie", "session=bench-session"),
        ("proxy-authorization", "Basic YmVuY2g6YmVuY2g="),
        ("x-debug-token", "bench-debug"),
        ("x-internal-user", "bench-user"),
    ]


# ---------------------------------------------------------------- configs


def keyswap_cluster(listener: str) -> str:
    """The cluster a keyswap listener sends to: its own, carrying keyswap's
    final (upstream) stage, so the other listeners' requests never meet it."""
    return f"responder-{listener}"


def keyswap_config(listener: str) -> str:
    if listener in LISTENER_ONLY:
        match = {"path_prefix": "/"}
    else:
        # Envoy's route `bench`, sent to the listener's own cluster (envoy_config).
        match = {"route_name": "bench", "clusters": [keyswap_cluster(listener)]}
    config = {
        "clients": [
            {"id": client_id(i), "key_sha256": hashlib.sha256(key(i).encode()).hexdigest(), "routes": ["bench"]}
            for i in range(CLIENTS)
        ],
        "key_sources": [{"header": "authorization", "prefix": "Bearer "}],
        "routes": [
            {
                "name": "bench",
                "match": match,
                "inject": [
                    {"header": "authorization", "prefix": "Bearer ", "value": {"env": "BENCH_UPSTREAM_CREDENTIAL"}}
                ],
            }
        ],
        "strip_request_headers": STRIPPED,
        "client_id_header": CLIENT_HEADER,
        "unmatched_route": "deny",
    }
    return json.dumps(config, separators=(",", ":"))


def lua_source() -> str:
    table = ",\n".join(f'  ["{key(i)}"] = "{client_id(i)}"' for i in range(CLIENTS))
    strip = ", ".join(f'"{h}"' for h in STRIPPED)
    return f"""
local clients = {{
{table}
}}
local strip = {{{strip}}}
local credential = "Bearer {UPSTREAM_CREDENTIAL}"
function envoy_on_request(handle)
  local headers = handle:headers()
  local auth = headers:get("authorization")
  local client = nil
  if auth ~= nil and auth:sub(1, 7) == "Bearer " then
    client = clients[auth:sub(8)]
  end
  if client == nil then
    handle:respond({{[":status"] = "401", ["content-type"] = "application/json"}}, '{{"error":"invalid_key"}}')
    return
  end
  headers:replace("authorization", credential)
  headers:replace("{CLIENT_HEADER}", client)
  for _, name in ipairs(strip) do
    headers:remove(name)
  end
end
"""


def wasm_filter(name: str, wasm: Path, configuration: str, env: dict[str, str]) -> dict:
    vm_config: dict = {
        "vm_id": name,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": str(wasm)}},
    }
    if env:
        vm_config["environment_variables"] = {"key_values": env}
    return {
        "name": f"envoy.filters.http.wasm.{name}",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": name,
                "root_id": name,
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration},
                "vm_config": vm_config,
            },
        },
    }


def keyswap_filter(listener: str, wasm: Path) -> dict:
    """keyswap's filter for `listener`: the same object in the listener's
    chain (first stage) and in its cluster's (final stage)."""
    env = {"BENCH_UPSTREAM_CREDENTIAL": UPSTREAM_CREDENTIAL}
    return wasm_filter(listener, wasm, keyswap_config(listener), env)


def is_keyswap(listener: str) -> bool:
    return listener == "keyswap" or listener in VARIANTS


def filters_for(listener: str, noop_wasm: Path, keyswap_wasm: Path) -> list[dict]:
    if listener == "plain":
        return []
    if listener == "noop_wasm":
        return [wasm_filter("noop", noop_wasm, "", {})]
    if is_keyswap(listener):
        wasm = VARIANTS.get(listener, keyswap_wasm)
        return [keyswap_filter(listener, wasm)]
    if listener == "lua":
        return [
            {
                "name": "envoy.filters.http.lua",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua",
                    "default_source_code": {"inline_string": lua_source()},
                },
            }
        ]
    if listener == "native":
        return [
            {
                "name": "envoy.filters.http.api_key_auth",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                    "credentials": [{"key": key(i), "client": client_id(i)} for i in range(CLIENTS)],
                    # api_key_auth removes a leading "Bearer " from a header key itself.
                    "key_sources": [{"header": "authorization"}],
                    "forwarding": {"header": CLIENT_HEADER, "hide_credentials": True},
                },
            },
            {
                "name": "envoy.filters.http.credential_injector",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
                    "overwrite": True,
                    "credential": {
                        "name": "envoy.http.injected_credentials.generic",
                        "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                            "credential": {"name": "bench-upstream-credential"},
                            "header": "authorization",
                        },
                    },
                },
            },
            {
                "name": "envoy.filters.http.header_mutation",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
                    "mutations": {"request_mutations": [{"remove": h} for h in STRIPPED]},
                },
            },
        ]
    raise ValueError(listener)


def cluster_of(listener: str) -> str:
    return keyswap_cluster(listener) if is_keyswap(listener) and listener not in LISTENER_ONLY else "responder"


def responder_cluster(name: str, upstream_filter: dict | None) -> dict:
    """A cluster to the local responder; with `upstream_filter` (keyswap's
    final stage) as an upstream HTTP filter."""
    cluster: dict = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": RESPONDER_PORT}}}}
                    ]
                }
            ],
        },
    }
    if upstream_filter is not None:
        codec = {
            "name": "envoy.filters.http.upstream_codec",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
        }
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {}},
                "http_filters": [upstream_filter, codec],
            }
        }
    return cluster


def envoy_config(noop_wasm: Path, keyswap_wasm: Path) -> dict:
    listeners = []
    for name, port in LISTENERS:
        router = {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }
        hcm = {
            "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": name,
            "route_config": {
                "name": name,
                "virtual_hosts": [
                    {
                        "name": name,
                        "domains": ["*"],
                        "routes": [{"name": "bench", "match": {"prefix": "/"}, "route": {"cluster": cluster_of(name)}}],
                    }
                ],
            },
            "http_filters": filters_for(name, noop_wasm, keyswap_wasm) + [router],
        }
        listeners.append(
            {
                "name": name,
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [
                    {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
                ],
            }
        )
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": ADMIN_PORT}}},
        "static_resources": {
            "listeners": listeners,
            "clusters": [responder_cluster("responder", None)]
            + [
                responder_cluster(keyswap_cluster(name), keyswap_filter(name, VARIANTS.get(name, keyswap_wasm)))
                for name, _ in LISTENERS
                if is_keyswap(name) and name not in LISTENER_ONLY
            ],
            "secrets": [
                {
                    "name": "bench-upstream-credential",
                    "generic_secret": {"secret": {"inline_string": f"Bearer {UPSTREAM_CREDENTIAL}"}},
                }
            ],
        },
    }


# ---------------------------------------------------------------- processes


def wait_ready(proc: subprocess.Popen, what: str, probe, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bench: {what} exited with {proc.returncode} while starting")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"bench: {what} not ready after {timeout:.0f} s")


def envoy_ready() -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{ADMIN_PORT}/ready", timeout=1) as r:
        return r.status == 200


def responder_ready() -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", RESPONDER_PORT, timeout=1)
    try:
        conn.request("GET", "/ready")
        return conn.getresponse().status == 200
    finally:
        conn.close()


def cpu_ticks(pid: int) -> int:
    """utime + stime of every thread of `pid`, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ")" field 3 (state) is index 0, so utime (14) is 11, stime (15) is 12.
    return int(fields[11]) + int(fields[12])


# ---------------------------------------------------------------- checks


def request(port: int, headers: list[tuple[str, str]]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.putrequest("GET", "/bench/check", skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def verify(name: str, port: int) -> str:
    """Proves a listener does what it is measured for; returns a one-line account."""
    status, body = request(port, load_headers())
    if status != 200:
        raise SystemExit(f"bench: {name}: the load request got {status}, not 200: {body[:200]!r}")
    echoed = json.loads(body)
    seen = {}
    for n, v in echoed["headers"]:
        seen.setdefault(n, []).append(v)
    if name not in JOB_LISTENERS:
        if seen.get("authorization") != [f"Bearer {key(LOAD_CLIENT)}"]:
            raise SystemExit(f"bench: {name}: the floor changed the request")
        return "200, request proxied unchanged"
    problems = []
    if seen.get("authorization") != [f"Bearer {UPSTREAM_CREDENTIAL}"]:
        problems.append("the upstream did not get exactly the injected credential")
    if seen.get(CLIENT_HEADER) != [client_id(LOAD_CLIENT)]:
        problems.append(f"the upstream did not get {CLIENT_HEADER}: {client_id(LOAD_CLIENT)}")
    for h in STRIPPED:
        if h in seen:
            problems.append(f"{h} reached the upstream")
    if key(LOAD_CLIENT).encode() in body:
        problems.append("the client's key reached the upstream")
    bad_status, _ = request(port, [("authorization", "Bearer not-a-key")])
    if bad_status != 401:
        problems.append(f"a wrong key got {bad_status}, not 401")
    missing_status, _ = request(port, [])
    if missing_status != 401:
        problems.append(f"no key got {missing_status}, not 401")
    if problems:
        raise SystemExit(f"bench: {name} does not do the job: " + "; ".join(problems))
    return "200 with the credential injected, client id forwarded, key and 4 headers gone; wrong key 401, no key 401"


# ---------------------------------------------------------------- load


LATENCY = re.compile(r"^\s*(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.M)
REQUESTS = re.compile(r"(\d+) requests in ([\d.]+)(us|ms|s|m)")
ERRORS = re.compile(r"Non-2xx or 3xx responses: (\d+)")
SOCKET_ERRORS = re.compile(r"Socket errors: (.*)")
UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def run_wrk(port: int, seconds: int, args) -> dict:
    cmd = ["taskset", "-c", args.load_cpu, "wrk", "-t1", f"-c{args.connections}", f"-d{seconds}s", "--latency"]
    for n, v in load_headers():
        cmd += ["-H", f"{n}: {v}"]
    cmd.append(f"http://127.0.0.1:{port}/bench/load")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds + 30).stdout
    m = REQUESTS.search(out)
    if not m:
        raise SystemExit(f"bench: cannot read wrk's output:\n{out}")
    requests = int(m.group(1))
    elapsed = float(m.group(2)) * UNIT[m.group(3)]
    latency = {p: float(v) * UNIT[u] * 1e6 for p, v, u in LATENCY.findall(out)}
    errors = ERRORS.search(out)
    socket_errors = SOCKET_ERRORS.search(out)
    return {
        "requests": requests,
        "seconds": elapsed,
        "p50_us": latency.get("50"),
        "p99_us": latency.get("99"),
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": socket_errors.group(1) if socket_errors else "",
    }


def measure(pid: int, port: int, seconds: int, args) -> dict:
    tick = os.sysconf("SC_CLK_TCK")
    before = cpu_ticks(pid)
    result = run_wrk(port, seconds, args)
    after = cpu_ticks(pid)
    cpu_s = (after - before) / tick
    result["envoy_cpu_s"] = cpu_s
    result["cpu_us_per_req"] = cpu_s * 1e6 / max(result["requests"], 1)
    result["rps"] = result["requests"] / result["seconds"]
    return result


# ---------------------------------------------------------------- summary


def quartiles(values: list[float]) -> tuple[float, float, float]:
    v = sorted(values)
    if len(v) < 2:
        return v[0], v[0], v[0]
    q = statistics.quantiles(v, n=4, method="inclusive")
    return q[0], statistics.median(v), q[2]


def machine() -> dict:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    envoy_version = subprocess.run(
        [str(ROOT / ".venv/bin/envoy"), "--version"], capture_output=True, text=True
    ).stdout.strip()
    m = re.search(r"version: \S*?/(\d+\.\d+\.\d+)/", envoy_version) or re.search(r"version: (\S+)", envoy_version)
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "envoy": m.group(1) if m else envoy_version,
        "wrk": (wrk.stdout + wrk.stderr).split("\n")[0].strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def summarise(rounds: list[dict]) -> dict:
    names = [n for n, _ in LISTENERS]
    out: dict = {"listeners": {}}
    for name in names:
        runs = [r[name] for r in rounds]
        cpu = quartiles([x["cpu_us_per_req"] for x in runs])
        rps = quartiles([x["rps"] for x in runs])
        out["listeners"][name] = {
            "cpu_us_per_req": {"p25": cpu[0], "median": cpu[1], "p75": cpu[2],
                               "min": min(x["cpu_us_per_req"] for x in runs),
                               "max": max(x["cpu_us_per_req"] for x in runs)},
            "rps": {"p25": rps[0], "median": rps[1], "p75": rps[2]},
            "p50_us": statistics.median(x["p50_us"] for x in runs),
            "p99_us": statistics.median(x["p99_us"] for x in runs),
            "non_2xx": sum(x["non_2xx"] for x in runs),
            "requests": sum(x["requests"] for x in runs),
        }
    med = {n: out["listeners"][n]["cpu_us_per_req"]["median"] for n in names}
    added = {n: med[n] - med["plain"] for n in names}
    out["added_cpu_us"] = added
    out["ratio_keyswap_to_native_added"] = added["keyswap"] / added["native"] if added["native"] > 0 else None
    # The same ratio within each round (both measured minutes apart at most).
    paired = []
    for r in rounds:
        native = r["native"]["cpu_us_per_req"] - r["plain"]["cpu_us_per_req"]
        if native > 0:
            paired.append((r["keyswap"]["cpu_us_per_req"] - r["plain"]["cpu_us_per_req"]) / native)
    out["ratio_paired_by_round"] = quartiles(paired) if paired else None
    out["throughput_keyswap_vs_plain"] = (
        out["listeners"]["keyswap"]["rps"]["median"] / out["listeners"]["plain"]["rps"]["median"]
    )
    return out


def svg_chart(summary: dict, title: str) -> str:
    """A horizontal bar chart of median CPU per request with IQR whiskers."""
    names = [n for n, _ in LISTENERS]
    rows = [(n, summary["listeners"][n]["cpu_us_per_req"]) for n in names]
    top = max(r["p75"] for _, r in rows) * 1.15
    width, left, right, bar_h, gap, head = 640, 110, 90, 26, 12, 46
    height = head + len(rows) * (bar_h + gap) + 40
    scale = (width - left - right) / top
    colour = {"plain": "#9aa5b1", "noop_wasm": "#b8c2cc", "native": "#3e7cb1", "lua": "#e0a030", "keyswap": "#2f9e44"}
    colour.update({n: "#8fd19e" for n in VARIANTS})
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{left}" y="20" font-size="15" font-weight="bold">{title}</text>',
        f'<text x="{left}" y="38" fill="#555">Envoy CPU µs per request (median; whisker: 25th-75th percentile)</text>',
    ]
    for i, (name, r) in enumerate(rows):
        y = head + i * (bar_h + gap)
        w = r["median"] * scale
        out.append(f'<text x="{left - 8}" y="{y + bar_h * 0.7}" text-anchor="end">{name}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar_h}" fill="{colour[name]}"/>')
        x1, x2, ym = left + r["p25"] * scale, left + r["p75"] * scale, y + bar_h / 2
        out.append(f'<line x1="{x1:.1f}" y1="{ym}" x2="{x2:.1f}" y2="{ym}" stroke="#222" stroke-width="1.5"/>')
        for x in (x1, x2):
            out.append(f'<line x1="{x:.1f}" y1="{ym - 6}" x2="{x:.1f}" y2="{ym + 6}" stroke="#222" stroke-width="1.5"/>')
        out.append(f'<text x="{max(x2, left + w) + 6:.1f}" y="{y + bar_h * 0.7}">{r["median"]:.1f} µs</text>')
    axis_y = head + len(rows) * (bar_h + gap) + 4
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{width - right}" y2="{axis_y}" stroke="#888"/>')
    step = 5 if top <= 60 else 10 if top <= 120 else 25
    t = 0
    while t <= top:
        x = left + t * scale
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#888"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 18}" text-anchor="middle" fill="#555">{t}</text>')
        t += step
    out.append("</svg>")
    return "\n".join(out) + "\n"


def markdown(summary: dict, meta: dict) -> str:
    names = [n for n, _ in LISTENERS]
    what = {
        "plain": "Envoy, router only (floor)",
        "noop_wasm": "no-op proxy-wasm filter (wasm floor)",
        "native": "api_key_auth + credential_injector + header_mutation",
        "lua": "the same job in Lua",
        "keyswap": "keyswap",
    }
    what.update({n: f"keyswap variant: {VARIANTS[n].name}" for n in VARIANTS})
    m = meta["machine"]
    lines = [
        f"Run {m['date_utc']}: {meta['rounds']} rounds × {len(names)} listeners × {meta['duration_s']} s, "
        f"wrk -t1 -c{meta['connections']} (keep-alive, HTTP/1.1), {CLIENTS} clients; "
        f"Envoy {m['envoy']} `--concurrency 1` on CPU {meta['envoy_cpu']}, wrk and the responder on CPU {meta['load_cpu']}. "
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}; "
        f"load average at start {' '.join(m['loadavg_at_start'])}.",
        "",
        "| listener | what | CPU µs/request, median | 25th-75th pct | added over plain | req/s, median | p50 latency | p99 latency |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    for n in names:
        s = summary["listeners"][n]
        c = s["cpu_us_per_req"]
        added = summary["added_cpu_us"][n]
        lines.append(
            f"| {n} | {what[n]} | {c['median']:.1f} | {c['p25']:.1f}-{c['p75']:.1f} | "
            f"{'-' if n == 'plain' else f'{added:+.1f}'} | {s['rps']['median']:.0f} | "
            f"{s['p50_us'] / 1000:.2f} ms | {s['p99_us'] / 1000:.2f} ms |"
        )
    ratio = summary["ratio_keyswap_to_native_added"]
    paired = summary["ratio_paired_by_round"]
    lines += [
        "",
        f"- keyswap's added CPU ÷ the native chain's added CPU: **{ratio:.2f}** (ratio of the medians)"
        + (f"; per round, paired: median {paired[1]:.2f}, 25th-75th pct {paired[0]:.2f}-{paired[2]:.2f}" if paired else "")
        + ". Target: at most 1.2.",
        f"- keyswap's throughput ÷ plain Envoy's: **{summary['throughput_keyswap_vs_plain'] * 100:.0f}%** "
        "(medians). Target: at least 90%.",
    ]
    for n in VARIANTS:
        if summary["added_cpu_us"]["native"] > 0:
            lines.append(
                f"- Variant `{n}` ({VARIANTS[n].name}): added CPU {summary['added_cpu_us'][n]:+.1f} µs, "
                f"{summary['added_cpu_us'][n] / summary['added_cpu_us']['native']:.2f}× the native chain's; "
                f"throughput {summary['listeners'][n]['rps']['median'] / summary['listeners']['plain']['rps']['median'] * 100:.0f}% of plain."
            )
    lines += [
        f"- Non-2xx responses during measurement: "
        + ", ".join(f"{n} {summary['listeners'][n]['non_2xx']}" for n in names) + ".",
    ]
    return "\n".join(lines) + "\n"


def update_docs_block(block: str) -> None:
    doc = ROOT / "docs" / "performance.md"
    text = doc.read_text()
    start, end = "<!-- bench:envoy:start -->", "<!-- bench:envoy:end -->"
    i, j = text.find(start), text.find(end)
    if i < 0 or j < 0:
        raise SystemExit(f"bench: {doc} has no {start} … {end} block to update")
    doc.write_text(text[: i + len(start)] + "\n" + block + text[j:])


# ---------------------------------------------------------------- main


def write_outputs(meta: dict, summary: dict, rounds: list, update_docs: bool) -> None:
    (RUN / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "rounds": rounds}, indent=1))
    table = markdown(summary, meta)
    chart = svg_chart(summary, f"Envoy {meta['machine']['envoy']}, one worker, {CLIENTS} clients")
    (RUN / "report.md").write_text(table)
    (RUN / "cpu-per-request.svg").write_text(chart)
    print()
    print(table)
    print(f"bench: results in {RUN.relative_to(ROOT)}/ (results.json, report.md, cpu-per-request.svg)")
    if update_docs:
        (ROOT / "docs" / "performance-cpu.svg").write_text(chart)
        update_docs_block(table)
        print("bench: docs/performance.md and docs/performance-cpu.svg updated")


def render(args) -> None:
    data = json.loads(args.render.read_text())
    meta, summary = data["meta"], data["summary"]
    m = re.search(r"/(\d+\.\d+\.\d+)/", meta["machine"]["envoy"])
    if m:
        meta["machine"]["envoy"] = m.group(1)
    known = dict(LISTENERS)
    for name in summary["listeners"]:
        if name not in known:
            VARIANTS[name] = Path(meta.get("variants", {}).get(name, f"{name}.wasm"))
            LISTENERS.append((name, LISTENERS[-1][1] + 1))
    RUN.mkdir(parents=True, exist_ok=True)
    write_outputs(meta, summary, data["rounds"], args.update_docs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--duration", type=int, default=5.0, help="seconds of load per listener per round")
    p.add_argument("--warmup", type=int, default=2.0, help="seconds of unmeasured load per listener first")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--envoy-cpu", default="0")
    p.add_argument("--load-cpu", default="1")
    p.add_argument("--noop-wasm", type=Path)
    p.add_argument("--keyswap-wasm", type=Path)
    p.add_argument("--responder", type=Path, help="the echo-upstream binary")
    p.add_argument("--update-docs", action="store_true", help="write the tables and chart into docs/")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=WASM",
                   help="also measure another build of the keyswap filter doing the same job")
    p.add_argument("--variant-listener-only", action="append", default=[], metavar="NAME=WASM",
                   help="also measure a build from before the two stages, on the listener only")
    p.add_argument("--render", type=Path, metavar="RESULTS_JSON",
                   help="only write the tables and chart again from an earlier run's results.json")
    args = p.parse_args()
    if args.render:
        render(args)
        return
    if not (args.noop_wasm and args.keyswap_wasm and args.responder):
        p.error("--noop-wasm, --keyswap-wasm and --responder are required to run")
    for v in args.variant + args.variant_listener_only:
        name, _, wasm = v.partition("=")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or not wasm or name in dict(LISTENERS):
            raise SystemExit(f"bench: --variant {v}: expected NAME=WASM with a new lower-case NAME")
        VARIANTS[name] = Path(wasm).resolve()
        LISTENERS.append((name, LISTENERS[-1][1] + 1))
        JOB_LISTENERS.add(name)
        if v in args.variant_listener_only:
            LISTENER_ONLY.add(name)

    RUN.mkdir(parents=True, exist_ok=True)
    config = RUN / "envoy.json"
    config.write_text(json.dumps(envoy_config(args.noop_wasm.resolve(), args.keyswap_wasm.resolve()), indent=1))
    envoy_bin = str(ROOT / ".venv/bin/envoy")
    validate = subprocess.run([envoy_bin, "--mode", "validate", "-c", str(config)], capture_output=True, text=True)
    if validate.returncode != 0:
        raise SystemExit(f"bench: envoy --mode validate refused {config}:\n{validate.stdout[-3000:]}{validate.stderr[-3000:]}")

    procs: list[subprocess.Popen] = []
    try:
        responder = subprocess.Popen(
            ["taskset", "-c", args.load_cpu, str(args.responder), f"127.0.0.1:{RESPONDER_PORT}"],
            stdout=subprocess.DEVNULL, stderr=open(RUN / "responder.log", "w"),
        )
        procs.append(responder)
        wait_ready(responder, "the responder", responder_ready)
        envoy = subprocess.Popen(
            ["taskset", "-c", args.envoy_cpu, envoy_bin, "-c", str(config), "--concurrency", "1",
             "--log-level", "warn", "--base-id", "71"],
            stdout=subprocess.DEVNULL, stderr=open(RUN / "envoy.log", "w"),
        )
        procs.append(envoy)
        wait_ready(envoy, "Envoy", envoy_ready)

        print(f"bench: Envoy pid {envoy.pid} on CPU {args.envoy_cpu}; wrk and responder on CPU {args.load_cpu}")
        for name, port in LISTENERS:
            print(f"bench: check {name:9s} {verify(name, port)}")
        for name, port in LISTENERS:
            run_wrk(port, args.warmup, args)
        meta = {
            "machine": machine(),
            "rounds": args.rounds,
            "duration_s": args.duration,
            "connections": args.connections,
            "envoy_cpu": args.envoy_cpu,
            "load_cpu": args.load_cpu,
        }
        rounds = []
        for r in range(args.rounds):
            order = LISTENERS[r % len(LISTENERS):] + LISTENERS[: r % len(LISTENERS)]
            results = {}
            for name, port in order:
                results[name] = measure(envoy.pid, port, args.duration, args)
            rounds.append(results)
            print(f"bench: round {r + 1}/{args.rounds}: " + "  ".join(
                f"{n} {results[n]['cpu_us_per_req']:.1f}µs {results[n]['rps']:.0f}/s" for n, _ in LISTENERS))
        for name, port in LISTENERS:
            if name in JOB_LISTENERS:
                verify(name, port)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    meta["variants"] = {n: str(w.name) for n, w in VARIANTS.items()}
    write_outputs(meta, summarise(rounds), rounds, args.update_docs)


if __name__ == "__main__":
    main()
