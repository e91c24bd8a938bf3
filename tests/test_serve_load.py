"""`plainlm serve` under load: 32 concurrent streaming clients, several requests each, on a tiny model.

Every stream must complete (a finish_reason, then `data: [DONE]`), none may fail, and the KV pool must be
empty again afterwards (GET /health's counters). The greedy answers must not depend on the load: each
equals the same request sent alone. A client killed mid-stream frees its blocks, and the server serves on.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from helpers import REPO, plainlm_serve

pytestmark = pytest.mark.slow  # a server process and a few hundred streamed requests: about a minute

CLIENTS = 32
REQUESTS_PER_CLIENT = 3
OPTIONS = ["--served_model_name", "tiny", "--max_batch_size", "8", "--max_seq_length", "256", "--kv_cache_gb", "0.01"]


def stream_completion(url: str, prompt: str, max_tokens: int) -> tuple[str, str | None, bool]:
    """One streamed /v1/completions request, read raw: (the text, its finish_reason, whether [DONE] ended it)."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    text, finish, done = [], None, False
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue
            assert not done, "data after [DONE]"
            if line == "data: [DONE]":
                done = True
                continue
            choice = json.loads(line.removeprefix("data: "))["choices"][0]
            text.append(choice["text"])
            finish = choice["finish_reason"] or finish
    return "".join(text), finish, done


def used_blocks(url: str) -> int:
    return httpx.get(f"{url}/health", timeout=30).json()["kv_blocks_used"]


def wait_for_empty_pool(url: str, timeout: float = 30) -> int:
    deadline = time.monotonic() + timeout
    while (used := used_blocks(url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return used


def test_32_streaming_clients_all_complete_and_the_pool_empties(tiny_hf_dir: Path) -> None:
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "seven",
        "llamas",
        "eat",
        "green",
        "grass",
    ]
    jobs = [
        (" ".join(rng.choices(words, k=rng.randint(2, 40))), rng.randint(4, 40))
        for _ in range(CLIENTS * REQUESTS_PER_CLIENT)
    ]
    with plainlm_serve(tiny_hf_dir, *OPTIONS) as server:

        def client(index: int) -> list[tuple[str, str | None, bool]]:
            mine = jobs[index * REQUESTS_PER_CLIENT : (index + 1) * REQUESTS_PER_CLIENT]
            return [stream_completion(server.url, prompt, max_tokens) for prompt, max_tokens in mine]

        with ThreadPoolExecutor(CLIENTS) as pool:
            results = [r for client_results in pool.map(client, range(CLIENTS)) for r in client_results]
        assert len(results) == len(jobs)
        assert all(done for _, _, done in results), "a stream did not end with [DONE]"
        assert all(finish in ("stop", "length") for _, finish, _ in results)
        assert wait_for_empty_pool(server.url) == 0
        # The answers did not depend on the crowd: a sample of them, sent again alone, come back the same.
        for (prompt, max_tokens), (text, finish, _) in list(zip(jobs, results, strict=True))[::12]:
            assert stream_completion(server.url, prompt, max_tokens)[:2] == (text, finish)


def test_a_killed_client_frees_its_blocks_and_the_server_serves_on(tiny_hf_dir: Path) -> None:
    with plainlm_serve(tiny_hf_dir, *OPTIONS) as server:
        # A client in its own process, killed (SIGKILL: no goodbye) while its long stream is running.
        reader = (
            "import httpx, sys\n"
            "body = {'model': 'tiny', 'prompt': 'the quick brown fox', 'max_tokens': 200, 'temperature': 0,"
            " 'stream': True}\n"
            f"with httpx.stream('POST', '{server.url}/v1/completions', json=body, timeout=120) as r:\n"
            "    for line in r.iter_lines():\n"
            "        print(line, flush=True)\n"
        )
        client = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True, cwd=REPO)
        chunks = 0
        while chunks < 3:  # it is streaming: its request holds blocks
            chunks += client.stdout.readline().startswith("data: ")
        assert used_blocks(server.url) > 0
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=30)
        assert wait_for_empty_pool(server.url) == 0
        text, finish, done = stream_completion(server.url, "seven llamas", 8)
        assert done and finish == "length" and text
