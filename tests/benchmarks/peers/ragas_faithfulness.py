"""RAGAS 0.4 faithfulness over the bench's examples against the bench's local judge, the way RAGAS 0.4
documents it (`ragas.metrics.collections.Faithfulness` on `llm_factory` over an `AsyncOpenAI` client).

Runs in .peers/evaluation's python (scripts/peers_evaluation.sh), never in the project's venv.
argv: EXAMPLES.json JUDGE_URL, where EXAMPLES.json is a list of {"input", "output", "contexts"}.
Prints one JSON line: {"wall_s": seconds for all examples, imports and setup excluded, "scores": [...]}
(a score RAGAS could not compute is null).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("RAGAS_DO_NOT_TRACK", "true")  # its analytics call waits for a network timeout here
warnings.filterwarnings("ignore")


async def main(examples_path: str, judge_url: str) -> dict[str, Any]:
    from openai import AsyncOpenAI
    from ragas.llms import llm_factory
    from ragas.metrics.collections import Faithfulness

    with open(examples_path, encoding="utf-8") as handle:
        examples = json.load(handle)
    client = AsyncOpenAI(base_url=judge_url, api_key="unused", max_retries=0)
    metric = Faithfulness(llm=llm_factory("gpt-4o-mini", client=client))

    async def one(example: dict[str, Any]) -> float | None:
        result = await metric.ascore(user_input=example["input"], response=example["output"],
                                     retrieved_contexts=example["contexts"])
        value = float(result.value)
        return None if math.isnan(value) else value

    started = time.perf_counter()
    scores = await asyncio.gather(*(one(e) for e in examples))
    return {"wall_s": time.perf_counter() - started, "scores": scores}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
