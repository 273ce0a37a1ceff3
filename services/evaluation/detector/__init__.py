"""The local faithfulness detector: a baseline judge that needs no LLM endpoint.

Given a context and a statement, `Detector.judge` says SUPPORTED, CONTRADICTED or NOT_ENOUGH_INFO
with a probability for each and the sentences behind the verdict; `Detector.faithfulness` is the
share of an answer's claims it finds SUPPORTED. Built on frozen MiniLM embeddings
(`llmo.embedding`) and two small logistic regressions (`model.py`) whose committed artifact is
`artifact/`. Calls block: run them in a thread.
"""

from __future__ import annotations

from llmo.evaluation.detector.data import CONTRADICTED, LABELS, NOT_ENOUGH_INFO, SUPPORTED
from llmo.evaluation.detector.detector import BUILTIN_DIR, Detector, Evidence, Faithfulness, Verdict
from llmo.evaluation.detector.model import ArtifactError, DetectorModel
from llmo.evaluation.detector.sentences import Sentence, split_sentences

__all__ = ["BUILTIN_DIR", "CONTRADICTED", "LABELS", "NOT_ENOUGH_INFO", "SUPPORTED", "ArtifactError", "Detector",
           "DetectorModel", "Evidence", "Faithfulness", "Sentence", "Verdict", "split_sentences"]
