"""Embeddings per second through the offline engine (LLM.embed) on the default model, at batch
1 (one input per call, back to back) and batch N (N inputs per call): prints one line per
batch size. Inputs are ~12-token sentences, distinct per call (embeddings skip the prefix
cache anyway). Usage: python bench/embeddings.py [--batches 1,64] [--seconds 10] [--pooling last]"""

from __future__ import annotations

import argparse
import time

from gateway import LLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pooling", default="last", choices=("last", "mean"))
    args = parser.parse_args()
    llm = LLM(args.model, embedding_pooling=args.pooling)
    counter = iter(range(1 << 30))

    def inputs(n: int) -> list[str]:
        return [f"Sentence number {next(counter)} about the weather in a small town." for _ in range(n)]
    llm.embed(inputs(8))   # warm-up: kernels compiled, pools started
    for batch in (int(b) for b in args.batches.split(",")):
        done, tokens, start = 0, 0, time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            texts = inputs(batch)
            llm.embed(texts)
            done += batch
            tokens += sum(len(llm.tokenizer.encode(t)) for t in texts)
        elapsed = time.perf_counter() - start
        print(f"batch {batch:>4}: {done / elapsed:8.1f} embeddings/s  ({tokens / elapsed:8.0f} tokens/s, "
              f"{done} in {elapsed:.1f} s, pooling {args.pooling})")


if __name__ == "__main__":
    main()
