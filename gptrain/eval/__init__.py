"""Evaluation: HellaSwag scored as the lecture does (batched), lm-evaluation-harness tasks, published baselines.

`hellaswag.evaluate` is what the training loop calls; `cli` is the `gptrain eval` command.
"""
