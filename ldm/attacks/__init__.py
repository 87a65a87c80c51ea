"""Red-teaming attacks on a deployed erasure (attack.py): the defended pipeline (pipeline.py), the adversarial
token space (tokens.py), UnlearnDiffAtk-style white-box prompt optimisation (unlearndiffatk.py), Ring-A-Bell-style
text-encoder search (ringabell.py), judges (judges.py), and the resumable runner (runner.py, factory.py)."""
