"""Evaluation: the benchmark protocol (benchmark.py), the registry and the eval stage (suite.py), one module per
benchmark (harness: lm-eval; humaneval; alpaca: AlpacaEval; mtbench: MT-Bench), and what they share: generation
(generate.py), judges (judges.py) and the code sandbox (sandbox.py)."""
