"""Shared test settings: never touch a model hub; fail fast instead of hanging."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
