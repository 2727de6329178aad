"""Frozen configuration dataclasses, validated once at construction.

Each class names the parameter and the allowed range in its errors. Derived numbers
(block counts, bucket ladders) live on the objects that derive them, never here.
This module must stay importable without jax or transformers at import time:
`jaxserve.core` reads the scheduler and cache configs from it.
"""

from __future__ import annotations

import dataclasses
