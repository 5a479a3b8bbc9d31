"""Reference implementations shared by tests/ and benchmarks/, never shipped in the wheel.

- official_pave: the official PAVE procedure, re-implemented from scratch as the baseline
- pave_comparison: the same seeded models and calibration rows through our PAVE and the baseline
- smile_forward: SMILE's forward evaluated token by token, expert by expert
- tiny_models: random models built in memory and perturbed "fine-tuned" copies

Import it from the repository root (pytest's ``pythonpath`` setting; ``python -m benchmarks.<name>``).
"""
