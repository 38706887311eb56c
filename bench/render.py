#!/usr/bin/env python3
"""Turns the figures bench/run.sh collected (name=value lines) into
bench/RESULTS.md: one Markdown table with each figure, its reference, the
ratio, the targets of issues 7 and 14 and PASS/MISS. Hit figures are medians
of the interleaved rounds with their spread; a ratio whose rounds disagree by
more than MAX_SPREAD is not reported. Standard library only."""

import sys

# Per-round ratios further apart than this (max - min, over the median) are noise.
MAX_SPREAD = 0.15


def load(path):
    figures = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            name, _, value = line.rstrip("\n").partition("=")
            figures[name] = value
    return figures


def main():
    f = load(sys.argv[1])
    print(render(f, table(f)))


def table(f):
    """The result rows: (scenario, figure, measured, reference, ratio, target, result)."""
    num = lambda name: float(f[name])  # noqa: E731
    ms = lambda us: f"{us / 1000:.2f} ms"  # noqa: E731
    verdict = lambda ok: "**PASS**" if ok else "**MISS**"  # noqa: E731
    rows = []

    def row(scenario, figure, measured, baseline="", ratio="", target="", result=""):
        rows.append((scenario, figure, measured, baseline, ratio, target, result))

    def runs(prefix):
        """The measured runs `<prefix><round>`, in round order."""
        rounds = sorted({int(k[len(prefix):].split("_")[0]) for k in f
                         if k.startswith(prefix) and k[len(prefix):].split("_")[0].isdigit()})
        return [f"{prefix}{r}" for r in rounds]

    def median(values):
        values = sorted(values)
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2

    def spread(values):
        """(max - min) / median: how far the rounds disagree."""
        return (max(values) - min(values)) / median(values)

    def listing(values, fmt="{:,.0f}"):
        return " / ".join(fmt.format(v) for v in values)

    def ratio_row(name, figure, ours, ref, target, ok):
        """A ratio of medians, reported only when its per-round values agree
        within 15% (round i of each server ran back to back, so the per-round
        ratio cancels slow load drifts; its spread says how much to trust it)."""
        ratios = [a / b for a, b in zip(ours, ref)]
        disagree = spread(ratios)
        if disagree > MAX_SPREAD:
            row(name, figure, listing(ours), listing(ref),
                f"none: rounds disagree by {disagree:.0%} ({listing(ratios, '{:.2f}')})",
                target, "**NO RESULT**" if target else "")
        else:
            r = median(ratios)
            row(name, figure, f"{median(ours):,.0f} (±{spread(ours) / 2:.0%})",
                f"{median(ref):,.0f} (±{spread(ref) / 2:.0%})",
                f"{r:.2f} (rounds {listing(ratios, '{:.2f}')})", target,
                verdict(ok(r)) if target else "")

    zipf = "2 hit, 10 000 keys (Zipf s=1)"
    for label, name in (("hot", "1 hit, one hot key"), ("zipf", zipf)):
        series = {}
        for server in ("proxy", "bare", "nginx"):
            names = runs(f"{label}_{server}_")
            series[server] = {stat: [num(f"{r}_{stat}") for r in names]
                              for stat in ("rps", "p50_us", "p99_us", "psi")}
        proxy, bare, nginx = series["proxy"], series["bare"], series["nginx"]
        for server, label_text in (("proxy", "proxy"), ("bare", "bare hyper"), ("nginx", "nginx proxy_cache")):
            rps = series[server]["rps"]
            row(name, f"throughput, {label_text}: median (± half the spread); rounds",
                f"{median(rps):,.0f} req/s (±{spread(rps) / 2:.0%}); {listing(rps)}")
        ratio_row(name, "throughput: proxy / bare hyper, req/s", proxy["rps"], bare["rps"],
                  "≥ 0.90 × bare hyper", lambda r: r >= 0.90)
        ratio_row(name, "throughput: proxy / nginx proxy_cache, req/s", proxy["rps"], nginx["rps"],
                  "≥ 1.5 × nginx", lambda r: r >= 1.5)
        row(name, "p50 latency, median: proxy / bare / nginx",
            f"{ms(median(proxy['p50_us']))} / {ms(median(bare['p50_us']))} / {ms(median(nginx['p50_us']))}")
        ratio_row(name, "p99 latency: proxy / bare hyper, µs", proxy["p99_us"], bare["p99_us"],
                  "≤ 1.2 × bare hyper", lambda r: r <= 1.2)
        row(name, "CPU pressure (PSI some avg10) at the end of each run, %: proxy / bare / nginx",
            f"{listing(proxy['psi'], '{:.0f}')} / {listing(bare['psi'], '{:.0f}')} / "
            f"{listing(nginx['psi'], '{:.0f}')}")
        errors = sum(int(v) for k, v in f.items()
                     if k.startswith(f"{label}_") and k.endswith("_errors") and "warmup" not in k)
        row(name, "errors, all runs (all servers)", f"{errors}", target="0", result=verdict(errors == 0))
    copies = [num(f"{r}_rps") for r in runs("zipf_barecopies_")]
    if copies:
        row(zipf, "throughput, bare hyper holding 10 000 distinct bodies: median (± half the spread); rounds",
            f"{median(copies):,.0f} req/s (±{spread(copies) / 2:.0%}); {listing(copies)}")
        ratio_row(zipf, "throughput: proxy / bare hyper holding 10 000 bodies (like for like), req/s",
                  [num(f"{r}_rps") for r in runs("zipf_proxy_")], copies, "", None)
    row(zipf, "upstream calls during the hit runs (proxy and nginx)",
        f[("zipf_upstream_calls")], target="0", result=verdict(int(f["zipf_upstream_calls"]) == 0))

    if "miss_proxy_requests" not in f:
        row("3–5", f.get("skipped", "skipped"), "—")
    name = "3 miss, 50 ms upstream"
    if "miss_proxy_requests" in f:
        misses_and_memory(f, row, num, ms, verdict)

    name = "6 hit, one hot key, client token required"
    if any(k.startswith("auth_proxy_") for k in f):
        a, p, b = (runs(f"{x}_") for x in ("auth_proxy", "hot_proxy", "hot_bare"))
        arps, prps, brps = ([num(f"{r}_rps") for r in x] for x in (a, p, b))
        row(name, "what is on", f["scenario6"])
        row(name, "throughput: median (± half the spread); rounds",
            f"{median(arps):,.0f} req/s (±{spread(arps) / 2:.0%}); {listing(arps)}")
        ratio_row(name, "throughput: token proxy / bare hyper, req/s", arps, brps,
                  "≥ 0.90 × bare hyper", lambda r: r >= 0.90)
        ratio_row(name, "throughput: token proxy / proxy without token, req/s", arps, prps,
                  "", None)
        ratio_row(name, "p99 latency: token proxy / bare hyper, µs",
                  [num(f"{r}_p99_us") for r in a], [num(f"{r}_p99_us") for r in b],
                  "≤ 1.2 × bare hyper", lambda r: r <= 1.2)
        errors = sum(int(v) for k, v in f.items() if k.startswith("auth_") and k.endswith("_errors"))
        row(name, "errors, all runs", f"{errors}", target="0", result=verdict(errors == 0))
    else:
        row(name, f.get("scenario6", "skipped"), "—")

    name = "8 hit, one hot key, every request a trace span"
    if any(k.startswith("traced_proxy_") for k in f):
        t, p = runs("traced_proxy_"), runs("hot_proxy_")
        trps, prps = ([num(f"{r}_rps") for r in x] for x in (t, p))
        row(name, "what is on", f["traced"])
        row(name, "throughput: median (± half the spread); rounds",
            f"{median(trps):,.0f} req/s (±{spread(trps) / 2:.0%}); {listing(trps)}")
        ratio_row(name, "throughput: traced proxy / proxy with traces off, req/s", trps, prps, "", None)
        ratio_row(name, "p99 latency: traced proxy / proxy with traces off, µs",
                  [num(f"{r}_p99_us") for r in t], [num(f"{r}_p99_us") for r in p], "", None)
        row(name, "spans dropped (queue full or export failed)", f.get("traced_spans_dropped", "?"))
        row(name, "what the sink received", f.get("traced_sink", "?"))

    if any(k.startswith("compare_proxy_") for k in f):
        name = f"9 hit, one hot key, another build: {f['compare']}"
        c, p = runs("compare_proxy_"), runs("hot_proxy_")
        ratio_row(name, "throughput: this build / the other build, req/s",
                  [num(f"{r}_rps") for r in p], [num(f"{r}_rps") for r in c], "", None)
        ratio_row(name, "p99 latency: this build / the other build, µs",
                  [num(f"{r}_p99_us") for r in p], [num(f"{r}_p99_us") for r in c], "", None)

    name = "7 hit, one hot key, /stats flooded"
    if any(k.startswith("stats_flood_") for k in f):
        quiet, flooded = runs("stats_quiet_"), runs("stats_flood_")
        flood = max(num(k) for k in f if k.startswith("stats_flood_rps_"))
        row(name, "/stats answered meanwhile", f"{flood:,.0f} req/s ({f['stats_conns']} connections)")
        ratio_row(name, "hit throughput: flooded / quiet, req/s",
                  [num(f"{r}_rps") for r in flooded], [num(f"{r}_rps") for r in quiet], "", None)
        ratio_row(name, "hit p99: flooded / quiet, µs",
                  [num(f"{r}_p99_us") for r in flooded], [num(f"{r}_p99_us") for r in quiet], "", None)
        control = runs("healthz_flood_")
        if control:
            # An equal flood of /healthz takes the same share of the proxy's
            # CPU: what is left is what /stats itself costs the hits.
            ratio_row(name, "hit p99: /stats flood / /healthz flood (the control), µs",
                      [num(f"{r}_p99_us") for r in flooded], [num(f"{r}_p99_us") for r in control],
                      "≤ 1.1 × the control", lambda r: r <= 1.1)

    if "profile_proxy_instructions" in f:
        # bench/profile.sh counts the plain release builds, whatever the run measured.
        name = "1 hit, instructions (callgrind, plain release builds)"
        pi, pa = num("profile_proxy_instructions"), num("profile_proxy_allocations")
        if "profile_bare_instructions" in f:
            bi = num("profile_bare_instructions")
            row(name, "user-space instructions per hit: proxy / bare hyper", f"{pi:,.0f}",
                f"{bi:,.0f}", f"{pi / bi:.2f}", "≤ 2.5 × bare hyper", verdict(pi / bi <= 2.5))
            row(name, "heap allocations per hit: proxy / bare hyper", f"{pa:.1f}",
                f["profile_bare_allocations"], "", "≤ 10", verdict(pa <= 10))
        if "profile_baseline_instructions" in f:
            row(name, "instructions / allocations per hit of the axum baseline (bench/baseline.rs)",
                f"{num('profile_baseline_instructions'):,.0f} / {f['profile_baseline_allocations']}")
    return rows


def misses_and_memory(f, row, num, ms, verdict):
    """Scenarios 3-5: miss path, stampede, memory per entry."""
    name = "3 miss, 50 ms upstream"
    up50, up99 = num("miss_upstream_p50_us"), num("miss_upstream_p99_us")
    px50, px99 = num("miss_proxy_p50_us"), num("miss_proxy_p99_us")
    row(name, "p50 latency: proxy / upstream alone", ms(px50), ms(up50))
    row(name, "p99 latency: proxy / upstream alone", ms(px99), ms(up99))
    row(name, "p50 overhead over upstream alone", ms(px50 - up50), target="< 1 ms",
        result=verdict(px50 - up50 < 1000))
    row(name, "p99 overhead over upstream alone", ms(px99 - up99))
    row(name, "p50 / p99 minus the nominal 50 ms", f"{ms(px50 - 50000)} / {ms(px99 - 50000)}")
    misses = int(f["miss_proxy_requests"])
    row(name, "requests (all misses) / upstream calls",
        f"{misses:,} / {int(f['miss_upstream_calls']):,}",
        result=verdict(int(f["miss_upstream_calls"]) >= misses and int(f["miss_proxy_errors"]) == 0))

    name = "4 1000 concurrent cold requests, 10 keys"
    calls, errors = int(f["stampede_upstream_calls"]), int(f["stampede_errors"])
    row(name, "upstream calls", f"{calls}", target="exactly 10", result=verdict(calls == 10))
    row(name, "errors", f"{errors} of {f['stampede_requests']}", target="0",
        result=verdict(errors == 0))
    row(name, "answers stored / collapsed / hit",
        f"{f['stampede_stored']} / {f['stampede_collapsed']} / {f['stampede_hit']}")
    row(name, "time for all answers", f"{f['stampede_elapsed_ms']} ms (upstream takes 200 ms)")

    name = "5 memory, 100 000 entries"
    before, after = num("mem_rss_before_kib") * 1024, num("mem_rss_after_kib") * 1024
    entries, body = int(f["mem_entries"]), int(f["mem_body_bytes"])
    per_entry = (after - before) / entries
    limit = 1.3 * body + 512
    row(name, "RSS before / after", f"{before / 2**20:.1f} MiB / {after / 2**20:.1f} MiB")
    row(name, "bytes per entry (RSS growth / entries)", f"{per_entry:,.0f} B",
        f"body {body:,} B", f"{per_entry / body:.2f}", f"≤ 1.3 × body + 512 = {limit:,.0f} B",
        verdict(per_entry <= limit))
    row(name, "time to fill", f"{f['mem_fill_seconds']} s ({entries:,} misses, 0 ms upstream)")


def render(f, rows):
    """RESULTS.md: how the run was made, the table, the raw figures."""
    out = []
    out.append("# Benchmark results\n")
    out.append("Written by `bash bench/run.sh` (issues 7 and 14); do not edit by hand — rerun it.\n")
    out.append(f"- Date: {f['date']}")
    out.append(f"- CPU: {f['cpu']} ({f['cpus']} CPUs); kernel {f['kernel']}")
    out.append(
        f"- Load average (1/5/15 min) before / after: {f['load_before']} / {f['load_after']}; "
        f"CPU pressure (PSI `some`, 60 s) before / after: {f.get('psi_before') or '?'} % / "
        f"{f.get('psi_after') or '?'} %. Other work on these CPUs shows up as noise in the "
        "req/s and latency figures (not in the callgrind counts)"
    )
    out.append(f"- Build: {f['rustc']}, release profile (lto = \"thin\", codegen-units = 1), "
               f"{f.get('build', 'plain')}; commit {f['commit']}")
    out.append(
        f"- Load: wrk {f['wrk']}, {f['wrk_threads']} thread pinned to CPU 1; the proxy, the fake upstream, "
        "bare hyper and nginx pinned to CPU 0 (`taskset`), so each server has one core (one tokio "
        "worker, one nginx worker)"
    )
    out.append(
        f"- Hits: {f['conns']} keep-alive connections, 2 s of warm-up, then {f['rounds']} rounds; "
        f"a round gives each server {f['duration']} s in turns of {f['slice']} s: bare hyper, "
        "nginx and the proxy (Zipf: then bare hyper holding 10,000 bodies) one after another, "
        "again and again, so that load which comes and goes falls on all alike; a round's "
        "req/s is its requests over its time, its p50 and p99 the median of its turns'; each "
        "figure is the median of the rounds (± half their spread, max − min over the median); a "
        f"ratio is the median of the per-round ratios, reported only when those agree within "
        f"{MAX_SPREAD:.0%}"
        + (f"; miss path: {f['miss_conns']} connections, a new key per request" if "miss_conns" in f else "")
    )
    out.append(
        "- The proxy runs with `RUST_LOG=warn`: the access-log event of each request is filtered "
        "out (the rest of the request-id middleware still runs)"
    )
    out.append(
        f"- Body: {int(f['body_bytes']):,} bytes from the proxy (the fake upstream's answer), "
        f"{int(f['bare_body_bytes']):,} from bare hyper (`src/demo/hashtag-detail-ufc324.json`), "
        f"{int(f['nginx_body_bytes']):,} from nginx (the fake upstream's answer, cached)"
    )
    out.append(
        "- References: `bench/bare_hyper.rs`, hyper 1.x + hyper-util on a current-thread runtime, no "
        "routing, the same body and a hit's headers prebuilt (the machine's limit); "
        "`bench/nginx.conf`, Debian's nginx-light with `proxy_cache` and `proxy_cache_lock on` in "
        "front of the same fake upstream, one worker, access log off"
    )
    out.append("")
    out.append("| Scenario | Figure | Measured | Baseline / reference | Ratio | Target | Result |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        out.append("| " + " | ".join(r) + " |")
    out.append("")
    checked = [r for r in rows if r[6]]
    passed = sum(1 for r in checked if "PASS" in r[6])
    out.append(f"{passed} of {len(checked)} checks pass.")
    out.append("")
    out.append("<details><summary>Raw figures of this run</summary>\n\n```")
    with open(sys.argv[1], encoding="utf-8") as raw:
        out.append(raw.read().rstrip("\n"))
    out.append("```\n</details>")
    return "\n".join(out)


if __name__ == "__main__":
    main()
