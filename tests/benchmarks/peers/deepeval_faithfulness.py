"""DeepEval 4 `FaithfulnessMetric` over the bench's examples against the bench's local judge (`GPTModel`
pointed at it with `base_url`), with DeepEval's defaults (async mode, a reason for each score).

Runs in .peers/evaluation's python (scripts/peers_evaluation.sh), never in the project's venv; the bench
starts it in a scratch directory (DeepEval writes a `.deepeval/` folder into the working directory).
argv: EXAMPLES.json JUDGE_URL, where EXAMPLES.json is a list of {"input", "output", "contexts"}.
Prints one JSON line: {"wall_s": seconds for all examples, imports and setup excluded, "scores": [...]}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("DEEPEVAL_TELEMETRY_OPT_OUT", "YES")
warnings.filterwarnings("ignore")


async def main(examples_path: str, judge_url: str) -> dict[str, Any]:
    from deepeval.metrics import FaithfulnessMetric
    from deepeval.models import GPTModel
    from deepeval.test_case import LLMTestCase

    with open(examples_path, encoding="utf-8") as handle:
        examples = json.load(handle)
    model = GPTModel(model="gpt-4o-mini", api_key="unused", base_url=judge_url)

    async def one(example: dict[str, Any]) -> float:
        metric = FaithfulnessMetric(model=model)  # a metric holds one test case's state: one per example
        await metric.a_measure(LLMTestCase(input=example["input"], actual_output=example["output"],
                                           retrieval_context=example["contexts"]), _show_indicator=False)
        return float(metric.score)

    started = time.perf_counter()
    scores = await asyncio.gather(*(one(e) for e in examples))
    return {"wall_s": time.perf_counter() - started, "scores": scores}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(sys.argv[1], sys.argv[2]))))
