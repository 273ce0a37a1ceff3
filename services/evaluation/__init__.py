"""The evaluation service (`llmo.evaluation`).

Built so far: the local faithfulness detector (`llmo.evaluation.detector`), the baseline judge that
needs no LLM endpoint, and `llmo eval faithfulness` to measure it on labelled claim/document pairs.
"""
