"""Helpers shared by the data_gen tests (test_data_stage, test_data_resume): a small chat set in both
prompt formats and its JSONL writer; not a test module."""
from __future__ import annotations

import json

CONVS = [
    [("user", "Hello! How can I help you today?"), ("assistant", "The quick brown fox jumps over the lazy dog.")],
    [("system", "You are a helpful assistant."), ("user", "What is the capital of France?"),
     ("assistant", "The capital of France is Paris."), ("user", "Explain how a transformer works."),
     ("assistant", "It drafts tokens with a small model and verifies them.")],
    [("user", "Please write a short poem about the sea.")],  # no answer: a counted skip
    [("user", "def add(a, b):"), ("assistant", "return a + b"), ("user", "print(add(2, 3))"),
     ("assistant", "Sure, here is a list:\n1. apples\n2. oranges")],
    [("user", "The dog sleeps in the sun."), ("assistant", "Speculative decoding drafts tokens.")],
    [("user", "What is the capital of France?"), ("assistant", "Paris.")],
]


def write_jsonl(path, convs=CONVS):
    with open(path, "w") as f:
        for k, c in enumerate(convs):
            f.write(json.dumps({"id": f"c{k}", "messages": [{"role": r, "content": t} for r, t in c]}) + "\n")
    return path
