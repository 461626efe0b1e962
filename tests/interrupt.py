"""Simulating a killed run: make a module-level function raise KeyboardInterrupt on its n-th call."""
from __future__ import annotations


def kill_on_call(monkeypatch, module, name: str, call: int) -> None:
    """Replace ``module.name`` so that its ``call``-th call raises KeyboardInterrupt (earlier calls pass)."""
    real = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt(f"simulated kill at call {call} of {name}")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
