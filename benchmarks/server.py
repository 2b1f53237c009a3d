"""`vlmstack serve` against the issue-25 targets: concurrent search, batched chat, a soak.

    .venv/bin/python -m benchmarks.server [--rounds 5] [--chat-rounds 4] [--soak 300] [--rate 4]

Starts `vlmstack serve` in a subprocess (127.0.0.1, a free port, the easy-VQA test index the
app uses, built once if missing), and beside it the same with OMP_NUM_THREADS=1; the two take
turns in every round of 1 and 2. From this process:
1. `--rounds` rounds of 50 concurrent `/v1/search` text queries (different ones: colours x
   shapes), alternating with 50 concurrent `GET /health` (what HTTP alone costs here);
   client p50/p95 and errors per round, medians over rounds; plus one search at a time, and
   where a search's time goes without HTTP (CLIP encoding, FAISS, JSON) in this process.
2. For each shipped VQA model, `--chat-rounds` rounds of 32 easy-VQA test questions (one
   image each, max_tokens 8, openai SDK in threads) sent one at a time and all at once, the
   order alternating between rounds so load from other work hits both: throughput ratio,
   latency of the concurrent run, answers that differ from the one-at-a-time ones.
3. A soak of the server as shipped: `--soak` seconds of chat, search and embeddings at `--rate` requests/s; errors,
   latency per kind, the server's resident memory after a 30 s warm-up and at the end.
Server-side latency comes from its access log. Each figure carries the 1-minute load
average around it (the machine is shared). Writes docs/benchmarks/server.md and .json.
"""

import argparse
import asyncio
import base64
import concurrent.futures
import itertools
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai

from apps.gradio_app import default_index, vqa_model_names
from benchmarks.common import write_report
from vlm.data import easyvqa

SEARCHES = 50  # the concurrent searches
CHATS = 32  # the concurrent chats
MAX_TOKENS = 8
WARM_UP = 30.0  # soak seconds before the memory baseline
TARGETS = {"search_p50_ms": 50, "search_p95_ms": 200, "chat_ratio": 4.0, "rss_growth_pct": 5.0}
ACCESS = re.compile(r"vlmstack\.server\.access: (\w+) (\S+) (\d+) ([\d.]+)ms")
# Different texts for the concurrent searches: every colour x shape, in three phrasings.
QUERIES = [
    phrase.format(c=c, s=s)
    for phrase in ("a {c} {s}", "{c} {s}", "the {s} is {c}")
    for c in easyvqa.COLORS
    for s in easyvqa.SHAPES
]


def load() -> float:
    return round(os.getloadavg()[0], 2)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def data_url(path: str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


class Server:
    """`vlmstack serve` in a subprocess, its log in a file; `access()` returns the access-log
    lines written since the last call as (method, path, status, ms)."""

    def __init__(self, index: Path, log: Path, *, label: str, env: dict[str, str]):
        self.port, self.log, self.label = free_port(), log, label
        vlmstack = Path(sys.executable).with_name("vlmstack")
        self.command = [str(vlmstack), "serve", "--index", str(index), "--port", str(self.port)]
        self.process = subprocess.Popen(
            self.command, stdout=subprocess.DEVNULL, stderr=log.open("w"), env={**os.environ, **env}
        )
        self.url, self._offset = f"http://127.0.0.1:{self.port}", 0
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"vlmstack serve exited {self.process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise SystemExit("vlmstack serve did not answer /health within 300 s")

    def access(self) -> list[tuple[str, str, int, float]]:
        text = self.log.read_text()
        new, self._offset = text[self._offset :], len(text)
        return [(m[1], m[2], int(m[3]), float(m[4])) for m in ACCESS.finditer(new)]

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


async def _burst(url: str, requests: list[tuple[str, str, dict | None]]) -> list[tuple[float, int]]:
    """Send all requests at once; (seconds, status or 0 for a transport error) each."""
    limits = httpx.Limits(max_connections=len(requests), max_keepalive_connections=len(requests))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as client:

        async def one(method: str, path: str, body: dict | None):
            started = time.perf_counter()
            try:
                status = (await client.request(method, path, json=body)).status_code
            except httpx.HTTPError:
                status = 0
            return time.perf_counter() - started, status

        return await asyncio.gather(*(one(*r) for r in requests))


def burst_stats(results: list[tuple[float, int]]) -> dict:
    seconds = [s for s, _ in results]
    return {
        "requests": len(results),
        "errors": sum(status != 200 for _, status in results),
        "p50_ms": ms(pct(seconds, 0.5)),
        "p95_ms": ms(pct(seconds, 0.95)),
        "max_ms": ms(max(seconds)),
    }


def search_rounds(servers: list["Server"], rounds: int) -> dict:
    """Rounds of 50 concurrent searches, each followed by 50 concurrent /health; the servers
    take turns within a round (the first one alternating), so load from other work hits all."""
    searches, health = {sv.label: [] for sv in servers}, {sv.label: [] for sv in servers}
    for r in range(rounds):
        queries = [QUERIES[(r * SEARCHES + i) % len(QUERIES)] for i in range(SEARCHES)]
        for server in servers if r % 2 == 0 else servers[::-1]:
            server.access()
            before = load()
            result = burst_stats(
                asyncio.run(_burst(server.url, [("POST", "/v1/search", {"query": q, "k": 10}) for q in queries]))
            )
            logged = [t for _, path, _, t in server.access() if path == "/v1/search"]
            result |= {"server_p50_ms": round(pct(logged, 0.5), 1), "server_p95_ms": round(pct(logged, 0.95), 1)}
            searches[server.label].append({"round": r + 1, "load_before": before, "load_after": load(), **result})
            before = load()
            result = burst_stats(asyncio.run(_burst(server.url, [("GET", "/health", None)] * SEARCHES)))
            health[server.label].append({"round": r + 1, "load_before": before, "load_after": load(), **result})
    out = {}
    for server in servers:
        server.access()
        alone = []
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for q in QUERIES[:20]:
                alone.append(
                    timed_call(lambda: client.post("/v1/search", json={"query": q, "k": 10}).raise_for_status())
                )
        logged = [t for _, path, _, t in server.access() if path == "/v1/search"]
        rs, hs = searches[server.label], health[server.label]
        out[server.label] = {
            "rounds": rs,
            "health_rounds": hs,
            "median_p50_ms": round(statistics.median(r["p50_ms"] for r in rs), 1),
            "median_p95_ms": round(statistics.median(r["p95_ms"] for r in rs), 1),
            "median_server_p50_ms": round(statistics.median(r["server_p50_ms"] for r in rs), 1),
            "errors": sum(r["errors"] for r in rs),
            "health_median_p50_ms": round(statistics.median(r["p50_ms"] for r in hs), 1),
            "alone_p50_ms": ms(pct(alone, 0.5)),
            "alone_server_p50_ms": round(pct(logged, 0.5), 1),
            "load_after": load(),
        }
    return out


def search_profile(index: Path, rounds: int) -> dict:
    """Where one search's time goes, in this process without HTTP: CLIP text encoding (1 and
    50 texts), FAISS + path lookup, JSON; and 50 threads searching one SearchService at once
    (the server's work for a burst, minus HTTP)."""
    from apps.search_service import SearchService
    from retrieval import Searcher

    def median_ms(fn, repeat: int) -> float:
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    queries = QUERIES[:SEARCHES]
    searcher = Searcher.open(index)
    vectors = [searcher.text_vector(q) for q in queries]
    hits = searcher.search_vector(vectors[0], k=10)
    body = {"object": "list", "data": [{"path": h.path, "score": h.score, "thumbnail_url": h.path} for h in hits]}
    before = load()
    out = {
        "clip_encode_1_text_ms": round(median_ms(lambda: searcher.clip.encode_texts(queries[:1]), 20), 1),
        "clip_encode_50_texts_ms": round(median_ms(lambda: searcher.clip.encode_texts(queries), 5), 1),
        "clip_encode_50_texts_ms_by_torch_threads": encode_by_threads(searcher.clip, queries, rounds),
        "faiss_and_paths_ms": round(
            median_ms(lambda: [searcher.search_vector(v, k=10) for v in vectors], 5) / SEARCHES, 3
        ),
        "json_ms": round(median_ms(lambda: [json.dumps(body) for _ in range(100)], 5) / 100, 3),
    }
    service = SearchService(index=index)
    service.search_text(queries[0], 10)
    bursts = []
    for _ in range(rounds):
        with concurrent.futures.ThreadPoolExecutor(SEARCHES) as pool:
            bursts.append(list(pool.map(lambda q: timed_call(service.search_text, q, 10), queries)))
    service.close()
    out |= {
        "threads_50_p50_ms": round(statistics.median(ms(pct(b, 0.5)) for b in bursts), 1),
        "threads_50_p95_ms": round(statistics.median(ms(pct(b, 0.95)) for b in bursts), 1),
        "load_before": before,
        "load_after": load(),
    }
    return out


def encode_by_threads(clip, texts: list[str], rounds: int) -> dict[int, float]:
    """Median ms to encode `texts` in one batch with 1 and with 2 torch threads, alternating:
    on a busy machine a second intra-op thread waits for a core at every parallel region."""
    import torch

    default, times = torch.get_num_threads(), {1: [], 2: []}
    for _ in range(rounds):
        for threads in times:
            torch.set_num_threads(threads)
            times[threads].append(timed_call(clip.encode_texts, texts))
    torch.set_num_threads(default)
    return {threads: ms(statistics.median(t)) for threads, t in times.items()}


def timed_call(fn, *args) -> float:
    started = time.perf_counter()
    fn(*args)
    return time.perf_counter() - started


def chat_messages(record) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": record.question},
                {"type": "image_url", "image_url": {"url": data_url(record.image)}},
            ],
        }
    ]


def ask(client: openai.OpenAI, model: str, messages: list[dict]) -> tuple[float, str]:
    """(seconds, answer), or the error as the answer."""
    started = time.perf_counter()
    try:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=MAX_TOKENS)
        answer = reply.choices[0].message.content
    except openai.OpenAIError as e:
        answer = f"ERROR {type(e).__name__}: {e}"
    return time.perf_counter() - started, answer


def chat_run(client, model: str, conversations: list[list[dict]], together: bool) -> dict:
    before, started = load(), time.perf_counter()
    if together:
        with concurrent.futures.ThreadPoolExecutor(len(conversations)) as pool:
            results = list(pool.map(lambda m: ask(client, model, m), conversations))
    else:
        results = [ask(client, model, m) for m in conversations]
    seconds = [s for s, _ in results]
    return {
        "seconds": round(time.perf_counter() - started, 2),
        "p50_ms": ms(pct(seconds, 0.5)),
        "p95_ms": ms(pct(seconds, 0.95)),
        "errors": sum(a.startswith("ERROR") for _, a in results),
        "answers": [a for _, a in results],
        "load_before": before,
        "load_after": load(),
    }


def chat_rounds(servers: list["Server"], models: list[str], rounds: int) -> dict:
    """Per server and model: rounds of the 32 chats one at a time and all at once. Models and
    servers take turns within a round, and which run goes first alternates between rounds."""
    records = easyvqa.vqa_records("test")
    picked = records[:: len(records) // CHATS][:CHATS]  # 32 questions on 32 different images
    conversations = [chat_messages(r) for r in picked]
    out = {sv.label: {} for sv in servers}
    for server in servers:
        for model in models:
            ask(server.client, model, conversations[0])  # load the model before timing
            out[server.label][model] = {"rounds": []}
    for r in range(rounds):
        for model in models:
            for server in servers if r % 2 == 0 else servers[::-1]:
                runs = {}
                for together in (False, True) if r % 2 == 0 else (True, False):
                    key = "concurrent" if together else "one_at_a_time"
                    runs[key] = chat_run(server.client, model, conversations, together)
                alone, conc = runs["one_at_a_time"], runs["concurrent"]
                out[server.label][model]["rounds"].append(
                    {
                        "round": r + 1,
                        "ratio": round(alone["seconds"] / conc["seconds"], 2),
                        "differing": sum(a != b for a, b in zip(alone["answers"], conc["answers"])),
                        "correct_concurrent": sum(
                            a.strip().lower() == rec.answer for a, rec in zip(conc["answers"], picked)
                        ),
                        **runs,
                    }
                )
    for by_model in out.values():
        for result in by_model.values():
            rs = result["rounds"]
            result |= {
                "median_ratio": round(statistics.median(r["ratio"] for r in rs), 2),
                "median_concurrent_p50_ms": round(statistics.median(r["concurrent"]["p50_ms"] for r in rs), 1),
                "median_concurrent_p95_ms": round(statistics.median(r["concurrent"]["p95_ms"] for r in rs), 1),
                "median_one_at_a_time_p50_ms": round(statistics.median(r["one_at_a_time"]["p50_ms"] for r in rs), 1),
                "errors": sum(r["concurrent"]["errors"] + r["one_at_a_time"]["errors"] for r in rs),
                "differing": sum(r["differing"] for r in rs),
            }
    return out


def soak(server: "Server", models: list[str], seconds: float, rate: float) -> dict:
    """Requests at a steady `rate`, cycling chat / search / embeddings; RSS every 5 s."""
    records = easyvqa.vqa_records("test")
    images = [data_url(im.path) for im in easyvqa.images("test")[:50]]
    http, client = (
        httpx.Client(base_url=server.url, timeout=120, limits=httpx.Limits(max_connections=64)),
        server.client,
    )
    clip = next(m.id for m in client.models.list() if m.kind == "clip")

    def search(i):
        return http.post("/v1/search", json={"query": QUERIES[i % len(QUERIES)], "k": 10}).raise_for_status()

    def embed(i):
        items = [QUERIES[i % len(QUERIES)], {"image": images[i % len(images)]}]
        return client.embeddings.create(model=clip, input=items)

    def chat(model):
        def send(i):
            record = records[(i * 37) % len(records)]
            client.chat.completions.create(model=model, messages=chat_messages(record), max_tokens=MAX_TOKENS)

        return send

    kinds = [("search", search), ("embeddings", embed)] + [(f"chat {m}", chat(m)) for m in models]
    cycle = itertools.cycle(kinds)

    def timed(kind, fn, i):
        started = time.perf_counter()
        try:
            fn(i)
            error = None
        except Exception as e:  # noqa: BLE001 - every failure counts as an error
            error = f"{type(e).__name__}: {str(e)[:200]}"
        return kind, started, time.perf_counter() - started, error

    pid = server.process.pid
    server.access()
    load_before, samples, futures = load(), [], []
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        start = time.perf_counter()
        next_sample = 0.0
        for i in itertools.count():
            due = start + i / rate
            if due - start >= seconds:
                break
            while (now := time.perf_counter()) < due:
                if now - start >= next_sample:
                    samples.append((round(now - start, 1), rss_mib(pid), load()))
                    next_sample += 5
                time.sleep(min(0.05, due - now))
            kind, fn = next(cycle)
            futures.append(pool.submit(timed, kind, fn, i))
        results = [f.result() for f in futures]
    samples.append((round(time.perf_counter() - start, 1), rss_mib(pid), load()))
    http.close()
    warm = next(rss for t, rss, _ in samples if t >= WARM_UP)
    end = samples[-1][1]
    per_kind = {}
    for kind, _ in kinds:
        secs = [s for k, _, s, _ in results if k == kind]
        per_kind[kind] = {
            "requests": len(secs),
            "errors": sum(1 for k, _, _, e in results if k == kind and e),
            "p50_ms": ms(pct(secs, 0.5)),
            "p95_ms": ms(pct(secs, 0.95)),
        }
    logged = server.access()
    return {
        "seconds": seconds,
        "rate": rate,
        "requests": len(results),
        "errors": sum(1 for *_, e in results if e),
        "error_examples": sorted({e for *_, e in results if e})[:5],
        "server_errors_logged": sum(1 for _, _, status, _ in logged if status >= 400),
        "per_kind": per_kind,
        "rss_start_mib": samples[0][1],
        "rss_warm_mib": warm,
        "rss_end_mib": end,
        "rss_max_mib": max(rss for _, rss, _ in samples),
        "rss_growth_pct": round((end - warm) / warm * 100, 2),
        "rss_samples": samples,
        "load_before": load_before,
        "load_max": max(la for *_, la in samples),
        "load_after": load(),
    }


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


def misses(search: dict, prof: dict, chat: dict) -> list[str]:
    """Why the missed targets are missed, from this run's figures: one paragraph each."""
    t, lines = TARGETS, []
    if search["median_p50_ms"] > t["search_p50_ms"] or search["median_p95_ms"] > t["search_p95_ms"]:
        lines += [
            f"Search misses by {search['median_p50_ms'] / t['search_p50_ms']:.1f}× at p50 and "
            f"{search['median_p95_ms'] / t['search_p95_ms']:.1f}× at p95. The search work is small: one search alone "
            f"takes {search['alone_server_p50_ms']} ms in the server, the whole burst's work without HTTP (50 threads, one "
            f"SearchService) p50 {prof['threads_50_p50_ms']} ms, FAISS + paths {prof['faiss_and_paths_ms']:.2f} ms and "
            f"JSON {prof['json_ms']:.3f} ms a query. 50 concurrent `GET /health`, which does nothing, already take p50 "
            f"{search['health_median_p50_ms']} ms: most of the time is 50 requests through one uvicorn event loop "
            "(connections, middleware, body parsing, a threadpool hop each) and the clients, sharing 2 busy cores.",
        ]
    short = {m: c["median_ratio"] for m, c in chat.items() if c["median_ratio"] < t["chat_ratio"]}
    if short:
        lines += [
            "Chat throughput misses for "
            + ", ".join(f"{m} ({r}×, {t['chat_ratio'] / r:.1f}× short)" for m, r in short.items())
            + ". One question alone takes "
            + ", ".join(f"{c['median_one_at_a_time_p50_ms']:.0f} ms ({m})" for m, c in chat.items())
            + ". Batching is static (`--max-batch 16`, 5 ms wait), so the 32 arrive as three batches (1–6, 16, "
            "10–15 in a side check reading the scheduler's batch sizes); with `--max-batch 32` (two batches, 1–2 and "
            "30–31) llava-easyvqa stayed at 2.0–2.5× while flamingo-easyvqa gave 3.7–6×: a LLaVA row carries its image "
            "as prompt tokens, so on CPU its batch costs nearly as much compute as its rows one by one.",
        ]
    return lines


def report(args, server: "Server", search: dict, prof: dict, chats: dict, soaked: dict | None) -> None:
    t, by_threads = TARGETS, prof["clip_encode_50_texts_ms_by_torch_threads"]
    shipped, chat = search[server.label], chats[server.label]
    sections = [
        f"Server: `{' '.join(['vlmstack', *server.command[1:3], '~/.cache/vlmstack/easyvqa-test.index'])}` "
        "(the easy-VQA test images, 1,000; shipped models; default `--max-batch 16`), started by the script on "
        "127.0.0.1 and a free port; beside it the same command with `OMP_NUM_THREADS=1` (one torch thread), the "
        "two taking turns in every round. Clients run in the benchmark's process on the same 2 cores, which other "
        "people's work was also using: the 1-minute load average (updated every 5 s) is written beside every figure.",
        "",
        "## Summary (the server as shipped)",
        "",
        "| target | figure (medians over rounds) | verdict |",
        "|---|---|---|",
        f"| 50 concurrent `/v1/search`: p50 ≤ {t['search_p50_ms']} ms | {shipped['median_p50_ms']} ms "
        f"| {verdict(shipped['median_p50_ms'] <= t['search_p50_ms'])} |",
        f"| same: p95 ≤ {t['search_p95_ms']} ms | {shipped['median_p95_ms']} ms "
        f"| {verdict(shipped['median_p95_ms'] <= t['search_p95_ms'])} |",
        f"| same: 0 errors | {shipped['errors']} | {verdict(shipped['errors'] == 0)} |",
    ]
    for model, c in chat.items():
        sections.append(
            f"| {model}: 32 concurrent chats ≥ {t['chat_ratio']}× one at a time | {c['median_ratio']}× "
            f"(p50 {c['median_concurrent_p50_ms']} ms, p95 {c['median_concurrent_p95_ms']} ms; "
            f"{c['differing']} answers differ, {c['errors']} errors) | {verdict(c['median_ratio'] >= t['chat_ratio'])} |"
        )
    if soaked:
        sections += [
            f"| soak {soaked['seconds']:.0f} s at {soaked['rate']}/s: 0 errors | {soaked['errors']} of {soaked['requests']} "
            f"| {verdict(soaked['errors'] == 0)} |",
            f"| soak: RSS growth ≤ {t['rss_growth_pct']}% after {WARM_UP:.0f} s | {soaked['rss_growth_pct']}% "
            f"({soaked['rss_warm_mib']} → {soaked['rss_end_mib']} MiB) "
            f"| {verdict(soaked['rss_growth_pct'] <= t['rss_growth_pct'])} |",
        ]
    sections += [line for paragraph in misses(shipped, prof, chat) for line in ("", paragraph)]
    sections += [
        "",
        f"## 1. {SEARCHES} concurrent `/v1/search` text queries (k=10), {args.rounds} rounds",
        "",
        "Different queries in each request (8 colours × 3 shapes in three phrasings). Client latency is from "
        "sending to the whole JSON received (httpx, asyncio, new connections); server latency from its access log. "
        f"Each burst is followed by {SEARCHES} concurrent `GET /health`, the cost of HTTP alone on this machine.",
        "",
        "| server | round | client p50 ms | client p95 ms | errors | server p50 ms | server p95 ms | /health p50 ms | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, result in search.items():
        sections += [
            f"| {label} | {r['round']} | {r['p50_ms']} | {r['p95_ms']} | {r['errors']} | {r['server_p50_ms']} "
            f"| {r['server_p95_ms']} | {h['p50_ms']} | {r['load_before']} → {r['load_after']} |"
            for r, h in zip(result["rounds"], result["health_rounds"])
        ]
    sections += [
        "",
        "| server | client p50 ms | client p95 ms | server p50 ms | /health p50 ms | one search at a time: client / server p50 ms |",
        "|---|---|---|---|---|---|",
        *[
            f"| {label} | {r['median_p50_ms']} | {r['median_p95_ms']} | {r['median_server_p50_ms']} "
            f"| {r['health_median_p50_ms']} | {r['alone_p50_ms']} / {r['alone_server_p50_ms']} |"
            for label, r in search.items()
        ],
        "",
        "Where the time goes, measured in the benchmark's process without HTTP (servers idle; load "
        f"{prof['load_before']} → {prof['load_after']}): CLIP text encoding of 1 query {prof['clip_encode_1_text_ms']} ms, "
        f"of 50 in one batch {prof['clip_encode_50_texts_ms']} ms (alternating torch threads: {by_threads[1]} ms "
        f"with 1, {by_threads[2]} ms with 2, the server's default); FAISS + path lookup "
        f"{prof['faiss_and_paths_ms']:.2f} ms a query; JSON of a 10-hit answer {prof['json_ms']:.3f} ms. 50 threads "
        "calling one `SearchService.search_text` at once (the server's work for a burst, minus HTTP): p50 "
        f"{prof['threads_50_p50_ms']} ms, p95 {prof['threads_50_p95_ms']} ms.",
        "",
        f"## 2. {CHATS} chats, one easy-VQA test question each (32 images), max_tokens {MAX_TOKENS}",
        "",
        "openai SDK (max_retries 0), one at a time against all at once from 32 threads; the order alternates "
        "between rounds. Ratio = seconds one at a time / seconds all at once. Correct: the concurrent answer "
        "equals the easy-VQA test answer.",
        "",
        "| server | model | round | one at a time s | all at once s | ratio | concurrent p50 / p95 ms | alone p50 ms "
        "| answers differing | correct (of 32) | errors | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, by_model in chats.items():
        for model, c in by_model.items():
            for r in c["rounds"]:
                a, k = r["one_at_a_time"], r["concurrent"]
                sections.append(
                    f"| {label} | {model} | {r['round']} | {a['seconds']} | {k['seconds']} | {r['ratio']} "
                    f"| {k['p50_ms']} / {k['p95_ms']} | {a['p50_ms']} | {r['differing']} | {r['correct_concurrent']} "
                    f"| {a['errors'] + k['errors']} "
                    f"| {min(a['load_before'], k['load_before'])}–{max(a['load_after'], k['load_after'])} |"
                )
    sections += [
        "",
        "| server | model | median ratio | concurrent p50 / p95 ms | one at a time p50 ms | differing | errors |",
        "|---|---|---|---|---|---|---|",
        *[
            f"| {label} | {model} | {c['median_ratio']}× | {c['median_concurrent_p50_ms']} / "
            f"{c['median_concurrent_p95_ms']} | {c['median_one_at_a_time_p50_ms']} | {c['differing']} | {c['errors']} |"
            for label, by_model in chats.items()
            for model, c in by_model.items()
        ],
    ]
    if soaked:
        sections += [
            "",
            f"## 3. Soak: {soaked['seconds']:.0f} s, {soaked['rate']} requests/s, cycling "
            f"{', '.join(soaked['per_kind'])}",
            "",
            "Embeddings requests carry one text and one image. Requests are sent on schedule whether or not "
            "earlier ones have returned (64 client threads).",
            "",
            "| kind | requests | errors | p50 ms | p95 ms |",
            "|---|---|---|---|---|",
            *[
                f"| {kind} | {k['requests']} | {k['errors']} | {k['p50_ms']} | {k['p95_ms']} |"
                for kind, k in soaked["per_kind"].items()
            ],
            "",
            f"Server resident memory (VmRSS): {soaked['rss_start_mib']} MiB at the start, {soaked['rss_warm_mib']} MiB "
            f"after {WARM_UP:.0f} s, {soaked['rss_end_mib']} MiB at the end (max {soaked['rss_max_mib']}): "
            f"{soaked['rss_growth_pct']}% growth. Errors in the server's access log: {soaked['server_errors_logged']}. "
            f"Load average {soaked['load_before']} at the start, at most {soaked['load_max']}, "
            f"{soaked['load_after']} at the end.",
        ]
        if soaked["error_examples"]:
            sections += ["", "Errors: " + "; ".join(f"`{e}`" for e in soaked["error_examples"])]
    write_report(
        "server",
        "`vlmstack serve` under load: search, batched chat, soak",
        sections,
        {
            "server_command": ["vlmstack", *server.command[1:]],
            "servers": SERVERS,
            "targets": TARGETS,
            "search": search,
            "search_profile": prof,
            "chat": chats,
            "soak": soaked,
        },
    )


# The server as shipped, and the same with one torch thread (OMP_NUM_THREADS=1): on a busy
# 2-core machine a second intra-op thread waits for a core at every parallel region.
SERVERS = {"default": {}, "1 torch thread": {"OMP_NUM_THREADS": "1"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="rounds of 50 concurrent searches")
    parser.add_argument("--chat-rounds", type=int, default=4, help="rounds of 32 chats alone and together, per model")
    parser.add_argument("--soak", type=float, default=300.0, help="soak seconds (0: no soak)")
    parser.add_argument("--rate", type=float, default=4.0, help="soak requests per second")
    args = parser.parse_args()
    models = vqa_model_names()
    with tempfile.TemporaryDirectory() as tmp:
        servers = []
        try:
            for i, (label, env) in enumerate(SERVERS.items()):
                servers.append(Server(default_index(), Path(tmp) / f"server{i}.log", label=label, env=env))
            search = search_rounds(servers, args.rounds)
            print("search", {k: (v["median_p50_ms"], v["median_p95_ms"]) for k, v in search.items()}, flush=True)
            profile = search_profile(default_index(), args.rounds)
            print("profile", profile, flush=True)
            chats = chat_rounds(servers, models, args.chat_rounds)
            print("chat", {k: {m: c["median_ratio"] for m, c in v.items()} for k, v in chats.items()}, flush=True)
            servers.pop().close()  # the soak is of the server as shipped
            soaked = soak(servers[0], models, args.soak, args.rate) if args.soak else None
        finally:
            for server in servers:
                server.close()
    report(args, servers[0], search, profile, chats, soaked)


if __name__ == "__main__":
    main()
