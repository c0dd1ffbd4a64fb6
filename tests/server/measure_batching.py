"""How close N concurrent single-sentence HTTP requests get to one direct translate_batch call.

    python tests/server/measure_batching.py --model-dir RUN/export/student-int8 \
        --sentences RUN/data/test.src -n 256

starts ``wdserve serve --model m=DIR`` on a free loopback port (default batching
settings unless flags are passed after ``--``), sends ``n`` single-sentence
requests at once, and compares sentences per second with CTranslate2 called
directly with the same thread count and decoding options. Client and server
share the machine's cores, so the ratio is a lower bound for a remote client.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def direct_seconds(model_dir: Path, sentences: list[str], beam_size: int, max_length: int,
                   repeats: int = 3, max_batch_size: int = 0) -> float:
    """Best-of-``repeats`` time of one translate_batch call over all sentences, threads as in the server."""
    import ctranslate2
    import sentencepiece as spm

    from wdserve.server.settings import ServeSettings

    _, intra = ServeSettings().thread_plan(1)
    translator = ctranslate2.Translator(str(model_dir), intra_threads=intra, inter_threads=1)
    tokenizer = spm.SentencePieceProcessor(model_file=str(model_dir / "sentencepiece.model"))
    batch = [tokenizer.encode(s, out_type=str) for s in sentences]
    translator.translate_batch(batch[:4], beam_size=beam_size, max_decoding_length=max_length)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        results = translator.translate_batch(batch, beam_size=beam_size, max_decoding_length=max_length,
                                             max_batch_size=max_batch_size)
        [tokenizer.decode_pieces(r.hypotheses[0]) for r in results]
        best = min(best, time.perf_counter() - started)
    return best


async def post_raw(port: int, body: bytes) -> int:
    """One POST /translate on its own connection; returns the status. Raw asyncio keeps the client cheap,
    so on a small machine the measurement is not limited by the HTTP client library."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    response = await reader.read()
    writer.close()
    return int(response.split(b" ", 2)[1])


async def burst_seconds(port: int, sentences: list[str], beam_size: int, max_length: int,
                        model: str = "m") -> float:
    """Wall time of len(sentences) concurrent one-sentence /translate requests."""
    bodies = [json.dumps({"q": s, "model": model, "beam_size": beam_size, "max_length": max_length}).encode()
              for s in sentences]
    await asyncio.gather(*[post_raw(port, body) for body in bodies[:16]])  # warm-up
    started = time.perf_counter()
    statuses = await asyncio.gather(*[post_raw(port, body) for body in bodies])
    seconds = time.perf_counter() - started
    bad = [status for status in statuses if status != 200]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {sorted(set(bad))}")
    return seconds


def measure(model_dir: Path, sentences: list[str], beam_size: int = 1, max_length: int = 64,
            server_flags: tuple[str, ...] = ()) -> dict[str, float]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "wdserve.cli", "serve", "--model", f"m={model_dir}", "--default-model", "m",
         "--port", str(port), "--log-level", "warning", "--queue-size", str(max(256, len(sentences))),
         *server_flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.2)
        served = min(asyncio.run(burst_seconds(port, sentences, beam_size, max_length)) for _ in range(3))
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    direct = direct_seconds(model_dir, sentences, beam_size, max_length)
    direct_32 = direct_seconds(model_dir, sentences, beam_size, max_length, max_batch_size=32)
    totals = {name: sum(float(line.split()[-1]) for line in metrics.splitlines() if line.startswith(name))
              for name in ("wdserve_batch_size_count", "wdserve_batch_size_sum")}
    return {"sentences": len(sentences), "direct_s": direct, "server_s": served,
            "direct_sent_per_s": len(sentences) / direct, "server_sent_per_s": len(sentences) / served,
            "fraction": direct / served,
            # the server's default max_batch_size is 32: the same call cut into the server's batch size
            "direct_batch32_s": direct_32, "fraction_vs_batch32": direct_32 / served,
            "mean_batch_size": totals["wdserve_batch_size_sum"]
            / max(1.0, totals["wdserve_batch_size_count"]),
            "cores": os.cpu_count() or 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--sentences", type=Path, required=True, help="one source sentence per line")
    parser.add_argument("-n", type=int, default=256, help="concurrent requests (sentences, cycled)")
    parser.add_argument("--beam-size", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("server_flags", nargs="*", help="extra `wdserve serve` flags (after --)")
    args = parser.parse_args()
    lines = [line for line in args.sentences.read_text(encoding="utf-8").splitlines() if line.strip()]
    sentences = [lines[i % len(lines)] for i in range(args.n)]
    result = measure(args.model_dir, sentences, args.beam_size, args.max_length, tuple(args.server_flags))
    for key, value in result.items():
        print(f"{key:>18}: {value:.4g}" if isinstance(value, float) else f"{key:>18}: {value}")


if __name__ == "__main__":
    main()
