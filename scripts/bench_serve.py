#!/usr/bin/env python3
"""Load test of a running `vllm-apple serve`: N concurrent streaming chat clients, each
sending R requests back to back; prints time to first token, inter-token latency (p50 /
p90 / p99), request and token throughput, and errors.

    scripts/bench_serve.py --url http://127.0.0.1:8000 --model NAME [--clients 16]
        [--requests 2] [--max-tokens 32] [--api-key KEY]
Needs `pip install openai` (tests/python/requirements.txt)."""
import argparse
import concurrent.futures
import statistics
import time

import openai

QUESTIONS = [
    "What is the capital of France?", "Name three colors.", "What is 12 plus 30?",
    "Write a haiku about the sea.", "Who wrote Hamlet?", "What is the boiling point of water?",
    "Give me a synonym for happy.", "What is the largest planet?",
]


def one_client(args, cid):
    client = openai.OpenAI(base_url=args.url + "/v1", api_key=args.api_key, timeout=3600, max_retries=0)
    records = []
    for r in range(args.requests):
        q = QUESTIONS[(cid + r) % len(QUESTIONS)]
        t0 = time.perf_counter()
        first, last, gaps, tokens = None, None, [], 0
        try:
            stream = client.chat.completions.create(
                model=args.model, messages=[{"role": "user", "content": q}], max_tokens=args.max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            for chunk in stream:
                now = time.perf_counter()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
                if any(c.delta.content for c in chunk.choices):
                    if first is None:
                        first = now - t0
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
            records.append({"ttft": first, "gaps": gaps, "tokens": tokens, "end": time.perf_counter(), "error": None})
        except Exception as e:  # noqa: BLE001 - every failure counts as an error
            records.append({"ttft": None, "gaps": [], "tokens": 0, "end": time.perf_counter(), "error": repr(e)})
    return records


def pct(v, p):
    if not v:
        return float("nan")
    v = sorted(v)
    return v[min(len(v) - 1, int(p / 100 * len(v)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        recs = [r for rs in pool.map(lambda c: one_client(args, c), range(args.clients)) for r in rs]
    wall = time.perf_counter() - t0
    ok = [r for r in recs if r["error"] is None]
    errors = [r["error"] for r in recs if r["error"] is not None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    gaps = [g for r in ok for g in r["gaps"]]
    tokens = sum(r["tokens"] for r in ok)
    print(f"{args.clients} clients x {args.requests} requests, max_tokens {args.max_tokens}: "
          f"{len(ok)} ok, {len(errors)} errors, {wall:.1f} s")
    print(f"TTFT s      p50 {pct(ttft, 50):.3f}  p90 {pct(ttft, 90):.3f}  p99 {pct(ttft, 99):.3f}  "
          f"mean {statistics.fmean(ttft) if ttft else float('nan'):.3f}")
    print(f"ITL s       p50 {pct(gaps, 50):.3f}  p90 {pct(gaps, 90):.3f}  p99 {pct(gaps, 99):.3f}")
    print(f"throughput  {len(ok) / wall:.2f} req/s, {tokens / wall:.1f} generated tok/s ({tokens} tokens)")
    for e in errors[:5]:
        print("error:", e)
    raise SystemExit(1 if errors else 0)


if __name__ == "__main__":
    main()
