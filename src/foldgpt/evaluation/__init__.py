"""Evaluation of a model, the one path `foldgpt eval` and `foldgpt bench` share: evaluate (evaluate_model:
perplexity and bits per byte, then the tasks, the cloze task and, optionally, lm-evaluation-harness), tasks
(where zero-shot multiple-choice tasks come from and how they are read), scoring (log-likelihood of
continuations, the tasks' accuracy) and cloze (a LAMBADA-style cloze task built from any text)."""
